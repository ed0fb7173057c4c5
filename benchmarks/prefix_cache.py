"""Prefix-cache benchmark: time to first token of requests sharing a long system prompt, the first
(every block prefilled, then saved) against repeated ones (the shared blocks restored from the pool),
in the same run, on the ``small`` preset of :mod:`benchmarks.decode` (random weights, real vocabulary,
experts MXFP4-packed) on whatever device JAX has.

    python -m benchmarks.prefix_cache                       # 2,000-token shared prompt, 3 repeats
    python -m benchmarks.prefix_cache --shared 2000 --user 40 --chunk 256 --layers 4
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import SMALL
from gptoss_jax.decode import Engine, SamplingParams


def ttft(engine: Engine, prompt: list[int]) -> float:
    """Seconds from submit to the first generated token (the engine's loop running)."""
    t0 = time.perf_counter()
    request = engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=1, stop_token_ids=()))
    next(iter(request))
    dt = time.perf_counter() - t0
    request.result()
    return dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=int, default=2000, help="tokens of the shared system prompt")
    ap.add_argument("--user", type=int, default=40, help="tokens of each request's own message")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk = prefix block")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    args = ap.parse_args(argv)

    import gptoss_jax
    from convert.synthetic import write_random_checkpoint

    cfg = SMALL.replace(num_hidden_layers=args.layers, layer_types=None)
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 200000, args.shared).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(os.path.join(tmp, "small"), cfg, seed=0)
        model = gptoss_jax.load(path, dtype=getattr(jnp, args.dtype))
    blocks = args.context // args.chunk
    rows = []
    for cached in (False, True):
        engine = Engine(model, max_batch=1, context=args.context, prefill_chunk=args.chunk,
                        prefix_cache_blocks=blocks if cached else 0)
        engine.start()  # compiles every program first
        try:
            times = [ttft(engine, shared + rng.integers(0, 200000, args.user).tolist())
                     for _ in range(1 + args.repeats)]
        finally:
            engine.stop()
        label = "prefix cache on" if cached else "prefix cache off"
        extra = f", hit rate {engine.prefix.status()['hit_rate']:.2f}" if cached else ""
        rows.append(f"| {label} | {times[0] * 1e3:.0f} ms | {np.median(times[1:]) * 1e3:.0f} ms{extra} |")
    print(f"device {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores), small preset {args.layers} layers {args.dtype}, shared {args.shared} + "
          f"{args.user} own tokens, chunk/block {args.chunk}, context {args.context}, batch 1")
    print("| run | first request TTFT | repeated (median) |\n| --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
