"""Fold trained LoRA adapters into their base model and write it as a checkpoint ``gptoss_jax.load``
(and so ``gptoss-jax serve``) reads, or as an official transformers-layout folder.

    python -m train.merge RUN_DIR/checkpoints OUT [--step N] [--base CHECKPOINT] [--experts mxfp4|dense]
                          [--to-official]

The base checkpoint, dtype and LoRA settings come from the training checkpoint's metadata. Experts
stay MXFP4 (re-quantized after adding the update) unless ``--experts dense`` asks for dense ones.
"""
from __future__ import annotations

import argparse
import logging
import sys

import jax.numpy as jnp
from flax import nnx

import convert
import gptoss_jax
from train import lora
from train.checkpointing import Checkpoints
from train.step import from_tree, to_tree

log = logging.getLogger("train.merge")


def load_lora_model(checkpoints: str, step: int | None = None, base: str | None = None, experts: str = "mxfp4",
                    dtype=None) -> gptoss_jax.GptOss:
    """The base model with the adapters of a lora training checkpoint attached (not yet merged)."""
    ckpts = Checkpoints(checkpoints)
    meta = ckpts.read_meta(step)
    info = meta["base"]
    if info["mode"] != "lora":
        raise ValueError(f"{checkpoints}: a '{info['mode']}' run has no adapters to merge")
    model = gptoss_jax.load(base or info["checkpoint"], dtype=jnp.dtype(dtype or info["dtype"]), experts=experts)
    lo = info["lora"]
    lora.add_lora(model, lo["rank"], lo["alpha"], 0.0, tuple(lo["targets"]))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    params, _, _ = ckpts.restore(meta["step"], to_tree(adapters))
    ckpts.close()
    return nnx.merge(graphdef, from_tree(adapters, params), rest)


def merge_checkpoint(checkpoints: str, out: str, step: int | None = None, base: str | None = None,
                     experts: str = "mxfp4", official: bool = False) -> str:
    """Merge a lora run's adapters (latest step unless ``step``) into the base and write ``out``:
    our Orbax format (``convert.save_checkpoint``), or with ``official`` the transformers layout with
    MXFP4 experts (``convert.export_official``). Tokenizer/generation files of the base are carried over."""

    model = lora.merge_lora(load_lora_model(checkpoints, step, base, experts))
    base_folder = base or Checkpoints(checkpoints).read_meta(step)["base"]["checkpoint"]
    extra = convert.carried_files(base_folder)
    if official:
        return convert.export_official(model, out, dtype=model.dtype.name, extra_files=extra, progress=False)
    return convert.save_checkpoint(model, out, extra_files=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", help="a lora run's checkpoint folder (OUTPUT_DIR/checkpoints)")
    p.add_argument("out", help="output folder (gptoss-jax checkpoint; official layout with --to-official)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base", default=None, help="base checkpoint folder (default: the one the run trained on)")
    p.add_argument("--experts", choices=("mxfp4", "dense"), default="mxfp4",
                   help="expert format of the merged model (mxfp4 re-quantizes after merging)")
    p.add_argument("--to-official", action="store_true",
                   help="write the transformers layout (MXFP4 experts) that transformers, vLLM and Ollama read")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = merge_checkpoint(args.checkpoints, args.out, args.step, args.base, args.experts, args.to_official)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
