"""Fold trained LoRA adapters into their base model and write it as a checkpoint ``gptoss_jax.load`` reads.

    python -m train.merge RUN_DIR/checkpoints OUT [--step N] [--base CHECKPOINT] [--experts mxfp4|dense]

The base checkpoint, dtype and LoRA settings come from the training checkpoint's metadata. Experts
stay MXFP4 (re-quantized after adding the update) unless ``--experts dense`` asks for dense ones.
"""
from __future__ import annotations

import argparse
import logging
import sys

import jax.numpy as jnp
from flax import nnx

import gptoss_jax
from train import lora
from train.checkpointing import Checkpoints
from train.export import write_model
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
                     experts: str = "mxfp4") -> str:
    """Merge a lora run's adapters (latest step unless ``step``) into the base and write ``out``."""
    model = lora.merge_lora(load_lora_model(checkpoints, step, base, experts))
    return write_model(model, out)  # SEAM: convert.save_checkpoint / convert.export_official


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", help="a lora run's checkpoint folder (OUTPUT_DIR/checkpoints)")
    p.add_argument("out", help="output folder (official transformers layout)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--base", default=None, help="base checkpoint folder (default: the one the run trained on)")
    p.add_argument("--experts", choices=("mxfp4", "dense"), default="mxfp4",
                   help="expert format of the merged model (mxfp4 re-quantizes after merging)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = merge_checkpoint(args.checkpoints, args.out, args.step, args.base, args.experts)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
