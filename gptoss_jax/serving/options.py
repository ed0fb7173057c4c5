"""Options shared by the generate, chat, serve and demo commands, their validation, and the engine they build.

Ranges are checked while parsing (argparse types); what needs the file system or the devices
(:func:`validate`: the checkpoint's layout, the vocabulary, the mesh, the port) is checked before the
model loads, so a wrong argument costs a second, not a model load.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time

from gptoss_jax.cli import UsageError
from gptoss_jax.config import ATTENTION_IMPLS, KV_BUCKET_MIN
from gptoss_jax.harmony import REASONING_EFFORTS
from gptoss_jax.sharding.mesh import add_mesh_arguments, check_mesh_arguments, mesh_from_args
from gptoss_jax.tokenizer import STOP_TOKEN_IDS, VOCAB_ENV, find_vocab

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")


def integer(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'>= {low}' if high is None else f'in [{low}, {high}]'}, "
                                             f"got {value}")
        return value
    return parse


def real(low: float, high: float | None = None, low_open: bool = False):
    """argparse type: a finite float >= ``low`` (> with ``low_open``), <= ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            lo = f"{'(' if low_open else '['}{low:g}"
            raise argparse.ArgumentTypeError(f"must be in {lo}, {'inf)' if high is None else f'{high:g}]'}, got {text}")
        return value
    return parse


def add_model_arguments(parser: argparse.ArgumentParser, ckpt: bool = True, max_batch: int = 1) -> None:
    """--ckpt, --dtype, --experts, --context, --max-batch, --prefill-chunk, --kv-bucket-min, --attention, --vocab,
    and the mesh."""
    g = parser.add_argument_group("model")
    if ckpt:
        g.add_argument("--ckpt", required=True,
                       help="checkpoint folder: official gpt-oss (e.g. gpt-oss-20b/) or converted by gptoss-jax convert")
    g.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dense weights and activations")
    g.add_argument("--experts", choices=("mxfp4", "dense"), default="mxfp4",
                   help="keep expert weights MXFP4-packed (default) or dense")
    g.add_argument("--context", type=integer(1), default=4096,
                   help="tokens per sequence, prompt + generated (capped at the model's maximum)")
    g.add_argument("--max-batch", type=integer(1), default=max_batch, help="sequences decoded together")
    g.add_argument("--prefill-chunk", type=integer(1), default=256,
                   help="prompt tokens per prefill call (chunks of several short prompts share one call)")
    g.add_argument("--kv-bucket-min", type=integer(1), default=KV_BUCKET_MIN,
                   help="smallest decode length bucket: a decode step reads the full-attention layers' cache up to "
                        "the smallest power of two from this (or the context) holding the running sequences; one "
                        "decode program per bucket")
    g.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="attention path: auto (exact while the keys fit one block or for decode on TPU/GPU, "
                        "beyond: the Pallas kernel for prefill on TPU/GPU, else blocked), xla (exact), blocked (flash-style, memory O(tokens x "
                        "block)), pallas (the Pallas kernel for prefill; decode keeps auto's path)")
    g.add_argument("--vocab", default=None,
                   help=f"o200k_base.tiktoken file or its folder (default ${VOCAB_ENV}, the tiktoken cache, "
                        "else download)")
    add_mesh_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 512) -> None:
    """--temperature, --top-p, --top-k, --seed, --max-tokens."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=real(0), default=1.0, help="0 = greedy (default 1.0, as the model card)")
    g.add_argument("--top-p", type=real(0, 1, low_open=True), default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=integer(0), default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=integer(0, 2**63 - 1), default=None, help="sampling seed (default: random)")
    g.add_argument("--max-tokens", type=integer(1), default=max_tokens, help="tokens to generate at most")


def add_chat_arguments(parser: argparse.ArgumentParser, console: bool = True) -> None:
    """--reasoning-effort; on a console also --system and --hide-reasoning."""
    g = parser.add_argument_group("chat")
    g.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default="medium",
                   help="how long the model thinks (harmony system message)")
    if console:
        g.add_argument("--system", default=None, help="instructions (a system prompt; harmony's developer message)")
        g.add_argument("--hide-reasoning", action="store_true", help="do not print the analysis channel")


def validate(args: argparse.Namespace) -> None:
    """What parsing cannot check, before anything loads: ``--ckpt`` (when the command has one), ``--vocab``
    and the mesh arguments. Raises :class:`UsageError` (or the vocabulary's VocabError)."""
    if getattr(args, "ckpt", None) is not None:
        check_checkpoint(args.ckpt)
    find_vocab(args.vocab)  # an explicit --vocab or $GPTOSS_VOCAB must exist
    try:
        check_mesh_arguments(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_checkpoint(path: str) -> None:
    """``--ckpt``: an existing folder in a layout :func:`gptoss_jax.load` reads (official transformers
    layout, ``original/``, or converted by ``gptoss-jax convert``); reads only JSON and safetensors headers."""
    from gptoss_jax.checkpoint.errors import CheckpointError
    from gptoss_jax.checkpoint.official import open_checkpoint
    from gptoss_jax.checkpoint.orbax import is_converted, read_marker

    if not os.path.exists(path):
        raise UsageError(f"--ckpt {path}: no such folder")
    if not os.path.isdir(path):
        raise UsageError(f"--ckpt {path}: not a folder (give the checkpoint's folder, not one of its files)")
    try:
        read_marker(path) if is_converted(path) else open_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"--ckpt {e}") from None


def check_port(host: str, port: int) -> None:
    """The server can listen on ``host:port``: bind a socket there (with SO_REUSEADDR, as uvicorn does)
    and release it."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None


def sampling_params(args: argparse.Namespace, stop_token_ids=STOP_TOKEN_IDS, **changes):
    from gptoss_jax.decode import SamplingParams

    values = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                  max_tokens=args.max_tokens, stop_token_ids=tuple(stop_token_ids))
    return SamplingParams(**{**values, **changes})


def build_engine(ckpt: str | os.PathLike, args: argparse.Namespace):
    """Load ``ckpt`` (on ``--mesh`` when given) and start a decoding engine on it (call ``engine.stop()`` when done)."""
    import jax
    import jax.numpy as jnp

    import gptoss_jax
    from gptoss_jax.decode import Engine, set_attention

    t0 = time.perf_counter()
    mesh = mesh_from_args(args)
    if jax.process_count() > 1:
        raise SystemExit("serving runs in one process (a mesh over its local devices); "
                         "multi-host decoding is not supported yet")
    model = gptoss_jax.load(ckpt, dtype=getattr(jnp, args.dtype), experts=args.experts, mesh=mesh, rules=args.rules)
    set_attention(model, getattr(args, "attention", "auto"))
    context = min(args.context, model.config.max_position_embeddings)
    if context < args.context:
        log.info("context capped at the model's maximum, %d tokens", context)
    engine = Engine(model, max_batch=args.max_batch, context=context, prefill_chunk=args.prefill_chunk,
                    prefix_cache_blocks=getattr(args, "prefix_cache_blocks", 0),
                    kv_bucket_min=getattr(args, "kv_bucket_min", KV_BUCKET_MIN))
    engine.start()
    log.info("loaded %s in %.1fs (context %d, batch %d%s)", ckpt, time.perf_counter() - t0, context, args.max_batch,
             "" if mesh is None else f", mesh {dict(mesh.shape)}")
    return engine
