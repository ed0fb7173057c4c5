"""MXFP4 grouped experts compiled deviceless for H100 (Triton) or v5p (Mosaic): one MoE expert layer of
gpt-oss-20b (packed experts, bf16 activations) through :mod:`gptoss_jax.kernels.mxfp4_gmm`.

Per case (decode batch 64, prefill 2,048 and 8,192 tokens; k = 4 of 32 experts, routing drawn uniformly
with a fixed seed, as the compile cannot see the router):
- weight bytes per call of both projections read from HBM, from the kernels' schedules, against
  distinct selected experts x packed expert size. TPU: the block axis is innermost and a weight block
  whose index does not change is not fetched again, so each selected expert is fetched once, in HBM
  tiles that pad lanes to 128. GPU: one program per (expert, N tile) loops over the expert's row blocks and
  streams the tile's stripe (tn x K/2 bytes + scales: 98 KB for the 20b) from HBM for the first block and
  loads it again for each further block, from L2 (the stripe is loaded 'evict_last'; the stripes of
  all programs resident at once, 132 SMs x a few, fit the 50 MB L2), so it counts once. The next
  column counts every load of the GPU's stripes, L2 hits included (the figure before stop 24);
- dense expert copies in the optimized HLO: any bf16 / f32 array whose shape holds an expert's [out, in]
  (or [in, out]) matrix;
- the program's temp bytes (memory_analysis) and, on TPU, cost_analysis' bytes accessed.
Inputs are given row-major layouts, as arrays placed on a device have (left free, the compiler picks
other parameter layouts and adds copies that a real call does not have).

    PYTHONPATH=/tmp/cudaplug:. python -m benchmarks.mxfp4_gmm_aot --target h100
    PYTHONPATH=/tmp/tpuplug:. TPU_SKIP_MDS_QUERY=1 TPU_WORKER_HOSTNAMES=localhost \\
        TPU_ACCELERATOR_TYPE=v5litepod-4 python -m benchmarks.mxfp4_gmm_aot --target v5p

``--tpu-blocks u8`` compiles the TPU kernel on the checkpoint's u8 [E, N, K/32, 16] blocks (converted to
the TPU layout, :func:`gptoss_jax.mxfp4.to_tpu`, inside the call) instead of the TPU layout stored at load
time (words u32 [E, Kp/8, N] with K padded to a multiple of 64, scales u8 [E, K/32 rounded up to 32, N]).
"""
from __future__ import annotations

import argparse
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout

from gptoss_jax import mxfp4
from gptoss_jax.config import PRESETS
from gptoss_jax.kernels import mxfp4_gmm
from gptoss_jax.layers.moe import _block_size, experts_forward

CASES = {"decode batch 64": 64, "prefill 2,048": 2048, "prefill 8,192": 8192}
AOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "aot"


def _device(target: str):
    from jax.experimental import topologies
    jax.config.update("jax_platforms", "cpu")
    if target == "v5p":
        return topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
    cfg = (AOT / f"{target}.txtpb").read_text()
    return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=cfg).devices[0]


def _weight_bytes(ids: np.ndarray, e: int, expert_bytes: int, backend: str) -> tuple[int, int]:
    """(bytes the kernels load of both projections' weights (GPU: L2 hits included), distinct experts x
    expert bytes: what both kernels read from HBM, before the TPU's tile padding)."""
    groups = np.bincount(ids.reshape(-1), minlength=e)
    distinct = int((groups > 0).sum())
    loads = distinct if backend == mxfp4_gmm.TPU else int(np.sum(-(-groups // _block_size(ids.size, e, 16))))
    return loads * expert_bytes, distinct * expert_bytes


def _dense_copies(hlo: str, shapes: list[tuple[int, int]]) -> list[str]:
    """bf16/f32 array shapes in ``hlo`` containing one of ``shapes`` (an expert's matrix) as adjacent dims."""
    found = set()
    for dtype, dims in re.findall(r"\b(bf16|f32)\[([0-9,]+)\]", hlo):
        d = [int(v) for v in dims.split(",")]
        for a, b in shapes:
            if any(d[i:i + 2] in ([a, b], [b, a]) for i in range(len(d) - 1)):
                found.add(f"{dtype}[{dims}]")
    return sorted(found)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=["h100", "h200", "v5p"], default="h100")
    ap.add_argument("--tpu-blocks", choices=["words", "u8"], default="words")
    ap.add_argument("--preset", default="gpt-oss-20b")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    dev = _device(args.target)
    backend = mxfp4_gmm.TPU if args.target == "v5p" else mxfp4_gmm.GPU
    sh = jax.sharding.SingleDeviceSharding(dev)
    e, h, i, k = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size, cfg.experts_per_token

    def spec(shape, dtype):  # row-major, as arrays placed on the device are (not a layout the compiler picks)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=Format(Layout(tuple(range(len(shape)))), sh))

    experts, expert_bytes = {}, 0
    for name, (n, kk) in {"gate_up": (2 * i, h), "down": (h, i)}.items():
        bshape, sshape = mxfp4.packed_shape((e, n, kk))
        if backend == mxfp4_gmm.TPU and args.tpu_blocks == "words":
            experts[f"{name}_blocks"] = spec((e, mxfp4.tpu_word_rows(kk), n), jnp.uint32)
            experts[f"{name}_scales"] = spec((e, mxfp4.scale_rows(kk // mxfp4.BLOCK), n), jnp.uint8)
        else:
            experts[f"{name}_blocks"] = spec(bshape, jnp.uint8)
            experts[f"{name}_scales"] = spec(sshape, jnp.uint8)
        experts[f"{name}_bias"] = spec((e, n), jnp.bfloat16)
        expert_bytes += mxfp4.packed_nbytes((n, kk))
    pad = 1.0  # HBM tiles of the TPU kernel's weight operands
    if backend == mxfp4_gmm.TPU:
        lanes = lambda v: -(-v // 128) * 128  # noqa: E731
        w, g = h // 8, h // 32  # both projections contract over 2880 (= H = I for gpt-oss)
        # TPU layout: N (a multiple of 128) in the lanes, words' rows a multiple of 8, scales padded to 32 rows;
        # u8 [.., G, 16] blocks: (32, 128) tiles, and the scales' G padded to 128 lanes
        pad = (w * 4 + mxfp4.scale_rows(g)) / (w * 4 + g) if args.tpu_blocks == "words" else \
            (-(-g // 32) * 32 * 128 + lanes(g)) / (w * 4 + g)
    print(f"{args.target} {args.preset}: {e} experts, packed expert {expert_bytes / 2**20:.2f} MiB "
          f"(gate_up + down), kernel {backend}"
          + (f", TPU weights as {args.tpu_blocks}" if backend == mxfp4_gmm.TPU else ""))
    print("| case | assignments | distinct experts | HBM weight bytes / (distinct x expert) | weight loads (L2 hits "
          "included) / (distinct x expert) | dense expert copies in HLO | temp MiB | HLO bytes accessed (TPU) |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    rng = np.random.default_rng(0)
    for case, tokens in CASES.items():
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(tokens)]).astype(np.int32)
        f = jax.jit(lambda x, ids, w, ex: experts_forward(x, ids, w, ex, e, cfg.swiglu_alpha, cfg.swiglu_limit,
                                                          kernel=backend))
        compiled = f.lower(spec((tokens, h), jnp.bfloat16), spec((tokens, k), jnp.int32),
                           spec((tokens, k), jnp.bfloat16), experts).compile()
        hlo = compiled.as_text()
        assert "mxfp4_gmm_fwd" in hlo, "the kernel is not in the compiled program"
        loads, ideal = _weight_bytes(ids, e, expert_bytes, backend)
        reads, loads = int(ideal * pad), int(loads * pad)
        copies = _dense_copies(hlo, [(2 * i, h), (h, i)])
        cost = compiled.cost_analysis() if backend == mxfp4_gmm.TPU else None
        accessed = f"{cost['bytes accessed'] / 2**20:.0f} MiB" if cost else "n/a"
        print(f"| {case} | {ids.size} | {ideal // expert_bytes} | {reads / ideal:.2f} | {loads / ideal:.2f} | "
              f"{', '.join(copies) or 'none'} | {compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f} | {accessed} |")


if __name__ == "__main__":
    main()
