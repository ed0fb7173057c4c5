"""Options shared by the generate, chat, serve and demo commands, and the engine they build."""
from __future__ import annotations

import argparse
import logging
import os
import time

from gptoss_jax.config import ATTENTION_IMPLS
from gptoss_jax.harmony import REASONING_EFFORTS
from gptoss_jax.sharding.mesh import add_mesh_arguments, mesh_from_args
from gptoss_jax.tokenizer import STOP_TOKEN_IDS, VOCAB_ENV

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float32")


def add_model_arguments(parser: argparse.ArgumentParser, ckpt: bool = True, max_batch: int = 1) -> None:
    """--ckpt, --dtype, --experts, --context, --max-batch, --prefill-chunk, --attention, --vocab, and the mesh."""
    g = parser.add_argument_group("model")
    if ckpt:
        g.add_argument("--ckpt", required=True,
                       help="checkpoint folder: official gpt-oss (e.g. gpt-oss-20b/) or converted by gptoss-jax convert")
    g.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dense weights and activations")
    g.add_argument("--experts", choices=("mxfp4", "dense"), default="mxfp4",
                   help="keep expert weights MXFP4-packed (default) or dense")
    g.add_argument("--context", type=int, default=4096,
                   help="tokens per sequence, prompt + generated (capped at the model's maximum)")
    g.add_argument("--max-batch", type=int, default=max_batch, help="sequences decoded together")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per prefill call (chunks of several short prompts share one call)")
    g.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="attention path: auto (exact while the keys fit one block, blocked beyond), xla (exact), "
                        "blocked (flash-style, memory O(tokens x block)), pallas")
    g.add_argument("--vocab", default=None,
                   help=f"o200k_base.tiktoken file or its folder (default ${VOCAB_ENV}, the tiktoken cache, "
                        "else download)")
    add_mesh_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int = 512) -> None:
    """--temperature, --top-p, --top-k, --seed, --max-tokens."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0, as the model card)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")


def add_chat_arguments(parser: argparse.ArgumentParser, console: bool = True) -> None:
    """--reasoning-effort; on a console also --system and --hide-reasoning."""
    g = parser.add_argument_group("chat")
    g.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default="medium",
                   help="how long the model thinks (harmony system message)")
    if console:
        g.add_argument("--system", default=None, help="instructions (a system prompt; harmony's developer message)")
        g.add_argument("--hide-reasoning", action="store_true", help="do not print the analysis channel")


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
    from gptoss_jax.decode import Engine
    from gptoss_jax.layers.attention import set_attention

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
    engine = Engine(model, max_batch=args.max_batch, context=context, prefill_chunk=args.prefill_chunk)
    engine.start()
    log.info("loaded %s in %.1fs (context %d, batch %d%s)", ckpt, time.perf_counter() - t0, context, args.max_batch,
             "" if mesh is None else f", mesh {dict(mesh.shape)}")
    return engine
