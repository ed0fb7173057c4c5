"""benchmarks.aot: the ideal-bytes arithmetic, the HLO byte summation, and deviceless compiles.

The H100 / v5p compiles need the PJRT plugins (never installed by the tool): they run where the
plugin is importable from this process's path or from ``GPTOSS_CUDA_PLUGIN`` / ``GPTOSS_TPU_PLUGIN``
(default /tmp/cudaplug, /tmp/tpuplug), and are skipped, naming the install command, otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import aot
from benchmarks.hlo_traffic import shape_bytes, traffic
from gptoss_jax.config import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distinct_experts_formula():
    assert aot.distinct_experts(32, 4, 1) == pytest.approx(4)
    assert aot.distinct_experts(32, 4, 2) == pytest.approx(4 + 4 * 28 / 32)  # the second token's new ones
    assert aot.distinct_experts(32, 4, 10_000) == pytest.approx(32)


@pytest.mark.slow
def test_ideal_bytes_of_20b_decode_by_hand():
    cfg = PRESETS["gpt-oss-20b"]
    h, q, kv, e, i, v = 2880, 64 * 64, 8 * 64, 32, 2880, 201088
    attn = 2 * (h * (q + 2 * kv) + q * h + q + 2 * kv + h + 64)
    dense_layer = attn + 2 * (2 * h + h * e + e)
    expert = (2 * i * h // 2 + 2 * i * h // 32 + 2 * 2 * i) + (h * i // 2 + h * i // 32 + 2 * h)
    for batch in (1, 64):
        ideal = aot.ideal_bytes(cfg, "decode", batch, 4095, 4096)
        experts = e * (1 - (1 - 4 / e) ** batch)
        want = 24 * (dense_layer + experts * expert) + 2 * (v * h + batch * h + h)
        assert ideal["weights"] == pytest.approx(want, rel=1e-9)
        # 12 full layers read 4096 positions, 12 sliding ones 128; every layer writes one
        per_pos = 2 * 8 * 64 * 2
        assert ideal["kv"] == batch * per_pos * (12 * 4096 + 12 * 128 + 24)
    assert aot.ideal_bytes(cfg, "decode", 1, 4095, 4096)["weights"] == pytest.approx(3.708e9, rel=1e-3)


# A hand-written module: a fusion that slices one row out of a [1024, 128] f32 parameter, an
# in-place row update of it, a 3-trip loop whose body launches one kernel, and a conditional.
HLO = """HloModule m, entry_computation_layout={}

%fused_slice (p0: f32[1024,128], p1: s32[]) -> f32[1,128] {
  %p0 = f32[1024,128]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,128]{1,0} dynamic-slice(%p0, %p1, %c), dynamic_slice_sizes={1,128}
}

%fused_update (p0: f32[1024,128], p1: f32[1,128], p2: s32[]) -> f32[1024,128] {
  %p0 = f32[1024,128]{1,0} parameter(0)
  %p1 = f32[1,128]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c = s32[] constant(0)
  %n = f32[1,128]{1,0} negate(%p1)
  ROOT %dus = f32[1024,128]{1,0} dynamic-update-slice(%p0, %n, %p2, %c)
}

%fused_add (p0: f32[256]) -> f32[256] {
  %p0 = f32[256]{0} parameter(0)
  ROOT %a = f32[256]{0} add(%p0, %p0)
}

%body (t: (s32[], f32[256])) -> (s32[], f32[256]) {
  %t = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[256]{0} get-tuple-element(%t), index=1
  %y = f32[256]{0} fusion(%x), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[256]{0}) tuple(%i, %y)
}

%cond (t: (s32[], f32[256])) -> pred[] {
  %t = (s32[], f32[256]{0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%small (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  ROOT %y = f32[256]{0} fusion(%x), kind=kLoop, calls=%fused_add
}

%big (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %y = f32[256]{0} fusion(%x), kind=kLoop, calls=%fused_add
  ROOT %z = f32[256]{0} fusion(%y), kind=kLoop, calls=%fused_add
}

ENTRY %main (a: f32[1024,128], i: s32[], x: f32[256], b: pred[]) -> f32[1024,128] {
  %a = f32[1024,128]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = f32[256]{0} parameter(2)
  %b = pred[] parameter(3)
  %row = f32[1,128]{1,0} fusion(%a, %i), kind=kLoop, calls=%fused_slice
  %upd = f32[1024,128]{1,0} fusion(%a, %row, %i), kind=kLoop, calls=%fused_update
  %z = s32[] constant(0)
  %t0 = (s32[], f32[256]{0}) tuple(%z, %x)
  %w = (s32[], f32[256]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %c = f32[256]{0} conditional(%b, %x, %x), true_computation=%small, false_computation=%big
  ROOT %out = f32[1024,128]{1,0} copy(%upd)
}
"""


def test_hlo_traffic_rules_on_a_hand_written_module():
    t = traffic(HLO)
    row = 128 * 4
    sliced = row + 4 + row  # one row and the index read, the row written
    updated = row + 4 + row  # the update and the index read, the row written in place
    loop = 3 * (2 * 256 * 4)  # the body's kernel, three times
    branch = 2 * (2 * 256 * 4)  # the costlier branch: two kernels
    copy = 2 * 1024 * row
    assert t.bytes == sliced + updated + loop + branch + copy
    assert t.kernels == 1 + 1 + 3 + 2 + 1
    assert t.unknown_loops == 0


PREFETCH_HLO = """HloModule prefetch

%fused_double (p0: bf16[64,128]) -> bf16[64,128] {
  %p0 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %a = bf16[64,128]{1,0:T(8,128)(2,1)} add(%p0, %p0)
}

ENTRY %main (w: bf16[64,128]) -> bf16[64,128] {
  %w = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %cs = (bf16[64,128]{1,0:T(8,128)(2,1)S(1)}, bf16[64,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w)
  %cd = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
  ROOT %y = bf16[64,128]{1,0:T(8,128)(2,1)} fusion(%cd), kind=kLoop, calls=%fused_double
}
"""


def test_hlo_traffic_charges_a_vmem_prefetch_once_in_hbm():
    """A weight prefetched into S(1) (VMEM on TPU) by copy-start/copy-done and read there by a fusion: one
    transfer (source + destination) and the fusion's read and write in all memory spaces; in memory space
    0 (HBM) the prefetch's HBM read and the fusion's HBM write only."""
    size = 64 * 128 * 2
    everywhere, hbm = traffic(PREFETCH_HLO), traffic(PREFETCH_HLO, memory_space=0)
    assert everywhere.bytes == 2 * size + 2 * size and everywhere.kernels == 2
    assert hbm.bytes == size + size and hbm.kernels == 2
    assert hbm.by_kernel == {"cs": size, "y": size}


def test_shape_bytes():
    assert shape_bytes("(bf16[2,3]{1,0}, s32[], u8[5])") == 12 + 4 + 5
    assert shape_bytes("pred[7]") == 7


def test_hlo_traffic_on_a_cpu_compiled_program_reads_one_row_and_updates_in_place():
    """XLA:CPU's own program: a one-row read of a table, and a donated buffer's one-row update."""
    table = jax.ShapeDtypeStruct((4096, 256), jnp.float32)
    i = jax.ShapeDtypeStruct((), jnp.int32)
    read = jax.jit(lambda a, i: jax.lax.dynamic_slice_in_dim(a, i, 1) * 2).lower(table, i).compile()
    assert traffic(read.as_text()).bytes <= 4 * 256 * 4  # the row read and written (+ the index), not the table
    write = jax.jit(lambda a, i: jax.lax.dynamic_update_slice_in_dim(a, jnp.ones((1, 256)), i, 0),
                    donate_argnums=0).lower(table, i).compile()
    assert traffic(write.as_text()).bytes <= 4 * 256 * 4


@pytest.mark.slow
def test_cpu_target_row_fields():
    row = aot.measure("cpu", "tiny", "decode", 2, 32, 8)
    for field in ("temp_bytes", "argument_bytes", "output_bytes", "peak_bytes", "hbm_bytes", "hlo_bytes",
                  "ideal_bytes", "kernels"):
        assert isinstance(row[field], int) and row[field] > 0, field
    assert row["hbm_source"] == "cost_analysis"
    assert row["ideal"]["kv"] == aot.kv_bytes(PRESETS["tiny"], 2, 9, 32) + aot.kv_bytes(PRESETS["tiny"], 2, 1, 32)


def _plugin_dir(kind: str) -> str | None:
    """Where the ``kind`` plugin can be imported from: '' (this path), a folder, or None."""
    module, _ = aot.PLUGINS[kind]
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is not None and (kind != "cuda" or importlib.util.find_spec(module)):
        return ""
    folder = os.environ.get(f"GPTOSS_{kind.upper()}_PLUGIN", f"/tmp/{kind}plug")
    return folder if os.path.exists(os.path.join(folder, *module.split("."))) else None


def _run_tool(args: list[str], plugin_dir: str | None) -> subprocess.CompletedProcess:
    path = [ROOT] + ([plugin_dir] if plugin_dir else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "benchmarks.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("target,kind", [("h100", "cuda"), ("v5p", "tpu")])
def test_tiny_decode_compiles_for_the_accelerator(target, kind):
    plugin = _plugin_dir(kind)
    if plugin is None:
        pytest.skip(f"the {kind} PJRT plugin is not importable: {aot.PLUGINS[kind][1]}")
    out = _run_tool(["--target", target, "--model", "tiny", "--batch", "2", "--context", "32", "--tokens", "8",
                     "--json"], plugin)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert (row["target"], row["part"], row["batch"]) == (target, "decode", 2)
    assert row["hbm_bytes"] > 0 and row["kernels"] > 0 and row["ideal_bytes"] > 0
    assert row["hbm_source"] == ("hlo" if kind == "cuda" else "hlo_hbm")
    assert (row["cost_analysis_bytes"] is None) == (kind == "cuda")


def test_missing_plugin_is_a_one_line_error_naming_the_command():
    if _plugin_dir("cuda") == "":
        pytest.skip("the CUDA plugin is importable from this process's path")
    out = _run_tool(["--target", "h100", "--model", "tiny"], None)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --target h100 needs the cuda PJRT plugin")
    assert "pip install --target /tmp/cudaplug" in out.stderr
