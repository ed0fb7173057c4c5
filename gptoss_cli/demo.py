"""``gptoss-jax demo``: the whole pipeline on a fresh clone, no weights needed.

1. write a tiny random checkpoint (preset tiny-harmony: 3 layers, the real 201,088-token vocabulary)
   in the official transformers layout;
2. convert it to our Orbax format (:func:`prepare`, ``convert.convert_checkpoint``);
3. answer a chat prompt, streaming (random weights: the text is gibberish);
4. with ``--serve``, serve it over the OpenAI API.

With real weights the same steps are ``gptoss-jax generate|chat|serve --ckpt gpt-oss-20b``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from gptoss_jax.serving import options
from gptoss_jax.serving.cli_serve import add_server_arguments, model_name, serve

PRESET = "tiny-harmony"
NAME = "tiny-harmony-random"
PROMPT = "What is a mixture-of-experts model? Answer in one sentence."
WARNING = ("gptoss-jax demo: a {preset} checkpoint with RANDOM weights (no download needed).\n"
           "Random weights produce gibberish: this shows the pipeline works, not what the model says.")


def default_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "gptoss-jax", "demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=default_dir(), help="where the random checkpoint is kept (default %(default)s)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--serve", action="store_true", help="after generating, serve the model over HTTP")
    parser.add_argument("--seed-weights", type=int, default=0, help="seed of the random checkpoint")
    add_server_arguments(parser)
    options.add_chat_arguments(parser)
    options.add_model_arguments(parser, ckpt=False, max_batch=8)
    options.add_sampling_arguments(parser, max_tokens=48)
    parser.set_defaults(context=1024, prefill_chunk=32)  # few chunk shapes to compile: a quick first run


def validate(args: argparse.Namespace) -> None:
    """Before anything is written or loaded: the shared checks, and with ``--serve`` a free port."""
    options.validate(args)
    if args.serve:
        options.check_port(args.host, args.port)


def make_checkpoint(folder: str, seed: int = 0) -> str:
    """The random tiny-harmony checkpoint in ``folder/tiny-harmony-random`` (official transformers layout),
    written once (to a temporary folder renamed at the end) and reused afterwards."""
    from convert.synthetic import write_random_checkpoint
    from gptoss_jax import PRESETS

    path = os.path.join(folder, NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        print(f"using the random checkpoint in {path}", file=sys.stderr)
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}-", dir=folder)
    try:
        write_random_checkpoint(tmp, PRESETS[PRESET], seed=seed)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote a random {PRESET} checkpoint to {path}", file=sys.stderr)
    return path


def prepare(ckpt: str) -> str:
    """Convert the official checkpoint ``ckpt`` once to ``ckpt + '-jax'`` (Orbax, packed experts) and return
    that folder, which the engine loads; an existing conversion is reused."""
    from convert import convert_checkpoint
    from gptoss_jax.checkpoint.orbax import MARKER

    dst = ckpt + "-jax"
    if os.path.isfile(os.path.join(dst, MARKER)):
        print(f"using the converted checkpoint in {dst}", file=sys.stderr)
        return dst
    convert_checkpoint(ckpt, dst, overwrite=os.path.lexists(dst))
    print(f"converted it to {dst} (gptoss-jax convert {ckpt} {dst})", file=sys.stderr)
    return dst


def run(args: argparse.Namespace) -> int:
    from gptoss_jax.harmony import ChatFormat
    from gptoss_jax.serving.cli_generate import generate

    print(WARNING.format(preset=PRESET), file=sys.stderr)
    ckpt = prepare(make_checkpoint(args.dir, args.seed_weights))
    fmt = ChatFormat(args.vocab)
    engine = options.build_engine(ckpt, args)
    try:
        print(f"\n>>> {args.prompt}", file=sys.stderr)
        generate(engine, fmt, args, args.prompt)
        if args.serve:
            serve(engine, fmt, args, model_name(args, ckpt))
        else:
            print(f"\nnext: gptoss-jax serve --ckpt {ckpt}   (OpenAI API at http://127.0.0.1:8000/v1)\n"
                  f"      gptoss-jax chat --ckpt {ckpt}\n"
                  f"real weights: the same commands with --ckpt path/to/gpt-oss-20b", file=sys.stderr)
    finally:
        engine.stop()
    return 0
