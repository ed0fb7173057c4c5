"""Expert-parallel MoE: replicate-and-reduce vs all-to-all.

1. Measured on a fake 8-device CPU mesh (expert=8): wall time (fastest of interleaved runs) of one
   jitted MoE expert layer (packed MXFP4 experts, float32 activations) per scheme, and the bytes each
   device sends in its collectives, read from the compiled HLO; one device without a mesh as baseline.
2. Computed at gpt-oss-20b / 120b scale (bf16 activations): bytes each device sends (= receives) per
   MoE layer for decode batches and training batches, per scheme.

    python -m benchmarks.moe_comm                    # both tables (markdown), ~2 minutes on 2 cores
    python -m benchmarks.moe_comm --skip-measure     # only the computed volumes
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptoss_jax import mxfp4  # noqa: E402
from gptoss_jax.config import PRESETS  # noqa: E402
from gptoss_jax.layers.moe import experts_forward  # noqa: E402
from gptoss_jax.sharding import expert_parallel_forward, mesh_from_spec  # noqa: E402

BF16 = 2


def volumes(cfg, shards: int, tokens: int, itemsize: int = BF16) -> dict[str, float]:
    """Bytes one device sends (= receives) per MoE layer (ring collectives), ``tokens`` in the expert group.

    reduce: tokens split over the group (all-gather x, reduce-scatter y) or replicated (all-reduce y):
      2 (n-1)/n N H b either way.
    all-to-all, ragged (exact row counts; XLA:CPU has no ragged-all-to-all): each (token, expert) pair
      whose expert is remote goes out and comes back: 2 k (n-1)/n ceil(N/n) H b; 'dedup' sends a token
      once per remote device holding any of its experts.
    all-to-all, dense (static shapes, exact: room for every assignment at every destination): each
      device exchanges n-1 buffers of ceil(N/n) min(k, E/n) rows each way: 2 (n-1) ceil(N/n) min(k, E/n) H b.
    """
    n, h, k, e = shards, cfg.hidden_size, cfg.experts_per_token, cfg.num_experts
    row = h * itemsize
    # expected number of devices (of n, E/n experts each) hit by a token's k distinct experts
    miss = math.comb(e - e // n, k) / math.comb(e, k)
    hit_devices = n * (1 - miss)
    per_device = math.ceil(tokens / n)  # all-to-all: tokens are split; with fewer tokens than devices the
    return {                             # busiest device holds one
        "reduce": 2 * (n - 1) / n * tokens * row,
        "a2a ragged": 2 * k * (n - 1) / n * per_device * row,
        "a2a ragged dedup": 2 * hit_devices * (n - 1) / n * per_device * row,
        "a2a dense": 2 * (n - 1) * per_device * min(k, e // n) * row,
    }


def computed_table(shards: int) -> str:
    lines = [f"Bytes each device sends (= receives) per MoE layer, bf16 activations, expert group of {shards} devices; "
             "in brackets: relative to reduce.", "",
             "| model | tokens in the group | reduce | a2a ragged | a2a ragged dedup | a2a dense (exact, static) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        cfg = PRESETS[name]
        for label, tokens in [("decode 1", 1), ("decode 8", 8), ("decode 64", 64), ("train 8x4096", 8 * 4096),
                              ("train 64x4096", 64 * 4096)]:
            v = volumes(cfg, shards, tokens)
            cells = [f"{_size(v['reduce'])}"] + [f"{_size(v[s])} ({v[s] / v['reduce']:.2f}x)"
                                                 for s in ("a2a ragged", "a2a ragged dedup", "a2a dense")]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|u8|s8|pred)\[([\d,]*)\]")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "u8": 1, "s8": 1, "pred": 1}


def collective_bytes(hlo: str, n: int) -> float:
    """Bytes one device sends in the ring collectives of compiled HLO text (groups of ``n``), from their
    result shapes (tuples summed): all-gather and all-to-all (n-1)/n of the result, reduce-scatter
    (n-1) results, all-reduce 2 (n-1)/n."""
    sent = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n}
    total = 0.0
    for line in hlo.splitlines():
        for op, share in sent.items():
            result, found, _ = line.partition(f" {op}(")
            if found and " = " in result:
                shapes = _SHAPE.findall(result.split(" = ", 1)[1])
                total += share * sum(math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[t] for t, dims in shapes)
    return total


def measure(hidden: int, num_experts: int, token_counts, repeats: int) -> str:
    n = 8
    cfg = PRESETS["tiny"].replace(hidden_size=hidden, intermediate_size=hidden, num_experts=num_experts)
    mesh = mesh_from_spec("expert=8")
    rng = np.random.default_rng(0)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    experts = {}
    for name, (out_dim, in_dim) in {"gate_up": (2 * i, h), "down": (h, i)}.items():
        w = rng.standard_normal((e, out_dim, in_dim)).astype(np.float32) * 0.05
        experts[f"{name}_blocks"], experts[f"{name}_scales"] = map(jnp.asarray, mxfp4.quantize(w, xp=np))
        experts[f"{name}_bias"] = jnp.asarray(rng.standard_normal((e, out_dim)) * 0.05, jnp.float32)
    args = (cfg.num_experts, cfg.swiglu_alpha, cfg.swiglu_limit)
    lines = [f"hidden = intermediate = {hidden}, {num_experts} experts, top-{cfg.experts_per_token}, packed MXFP4, "
             f"float32 activations; fastest of {repeats} interleaved runs; bytes each device sends in collectives, "
             "from the compiled HLO", "",
             "| tokens | one device | reduce | all-to-all (dense) | reduce bytes | all-to-all bytes |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    placed = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert")))
              for k, v in experts.items()}
    for tokens in token_counts:
        x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
        ids = jnp.asarray(np.stack([rng.choice(e, cfg.experts_per_token, replace=False) for _ in range(tokens)]),
                          jnp.int32)
        w = jnp.asarray(rng.dirichlet(np.ones(cfg.experts_per_token), tokens), jnp.float32)
        token_axes = ("expert",) if tokens % n == 0 else ()
        row = [str(tokens)]
        runs = [(jax.jit(lambda x, i, w, ex: experts_forward(x, i, w, ex, *args)), experts)]
        for scheme in ("reduce", "all_to_all"):
            f = jax.jit(lambda x, i, w, ex, s=scheme: expert_parallel_forward(
                x, i, w, ex, *args, mesh=mesh, expert_axes=("expert",), token_axes=token_axes, scheme=s))
            runs.append((f, placed))
        compiled = [(f.lower(x, ids, w, ex).compile(), ex) for f, ex in runs]
        moved = [collective_bytes(c.as_text(), n) for c, _ in compiled]
        samples = [[] for _ in compiled]
        for _ in range(repeats + 1):  # interleaved, so load from other processes hits every variant alike
            for c, (f, ex) in zip(samples, compiled):
                t = time.perf_counter()
                jax.block_until_ready(f(x, ids, w, ex))
                c.append(time.perf_counter() - t)
        times = [min(c[1:]) for c in samples]  # the first run warms up
        row += [f"{t * 1e3:.2f} ms" for t in times] + [_size(moved[1]), _size(moved[2])]
        if not token_axes:
            row[3] += " (tokens not split: falls back to reduce)"
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, nargs="+", default=[32, 128])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 2048])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-measure", action="store_true")
    args = p.parse_args(argv)
    print(computed_table(8))
    if not args.skip_measure:
        print(f"\nMeasured on {jax.device_count()} fake CPU devices ({os.cpu_count()} cores), jax {jax.__version__}:\n")
        for e in args.experts:
            print(measure(args.hidden, e, args.tokens, args.repeats) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
