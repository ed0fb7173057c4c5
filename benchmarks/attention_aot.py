"""One prefill attention call of gpt-oss shapes, compiled deviceless per implementation: temp bytes.

The engine's prefill shapes (:mod:`gptoss_jax.layers.attention`, fresh row): a full layer attends the
chunk's ``tokens`` queries (q [1, T, nq * D] as the projection gives it, the output reshaped back
as the output projection takes it) to a cache of ``tokens`` slots (positions 0..tokens-1), a sliding layer to
its ring (``window`` empty slots, position -1) followed by the chunk. bf16 q/k/v, 64 query heads, 8 KV
heads, head_dim 64 (gpt-oss-20b / 120b), batch 1. Prints one JSON object per (layer kind, impl):
``temp_bytes`` (``memory_analysis()``) and, on TPU, ``bytes_accessed`` (cost analysis; a Pallas
kernel counts as its declared cost, none given here, so only XLA's own ops are in it).

    PYTHONPATH=.:/tmp/tpuplug python -m benchmarks.attention_aot --target v5p --tokens 32768
    PYTHONPATH=.:/tmp/cudaplug python -m benchmarks.attention_aot --target h100 --tokens 32768
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks.aot import ATTENTION_IMPLS, TARGETS, PluginMissing, target_device


def measure(device, tokens: int, window: int, impl: str, heads=(64, 8, 64)) -> dict:
    import jax
    import jax.numpy as jnp

    from gptoss_jax import platform
    from gptoss_jax.layers.attention import attend_kv_major

    nq, nkv, d = heads
    s = tokens + (window if window else 0)
    sh = jax.sharding.SingleDeviceSharding(device)
    arr = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
    args = (arr((1, tokens, nq * d), jnp.bfloat16), arr((1, nkv, s, d), jnp.bfloat16),
            arr((1, nkv, s, d), jnp.bfloat16), arr((nq,), jnp.bfloat16))
    target = platform.of(device)

    def f(q, k, v, sinks):
        q_pos = jnp.arange(tokens, dtype=jnp.int32)[None]
        k_pos = jnp.concatenate([jnp.full((1, s - tokens), -1, jnp.int32), q_pos], axis=1)
        with platform.lowering_for(target):  # q and the output as the model's projections hold them
            out = attend_kv_major(q.reshape(1, tokens, nq, d), k, v, sinks, q_pos, k_pos, window, impl=impl)
            return out.reshape(1, tokens, nq * d)

    row = {"target": target, "tokens": tokens, "window": window, "attention": impl}
    try:
        compiled = jax.jit(f).lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # e.g. the exact path's T x S scores exceed the HBM
        return {**row, "error": str(e).splitlines()[0][:200]}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {**row, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "bytes_accessed": (cost or {}).get("bytes accessed")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="v5p")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--window", type=int, nargs="+", default=[0, 128])
    p.add_argument("--attention", choices=ATTENTION_IMPLS, nargs="+", default=["pallas", "blocked", "xla"])
    args = p.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    try:
        device = target_device(args.target)
    except PluginMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for window in args.window:
        for impl in args.attention:
            print(json.dumps(measure(device, args.tokens, window, impl)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
