"""The MXFP4 grouped-matmul kernels (Mosaic TPU and Triton GPU, run in Pallas interpret mode, and the CPU
loops) against the exact path: products of each block with its expert's decoded weights, and ``experts_forward`` through
the kernel against the block-grouped scan (values and gradients, LoRA on).

Bound (float32): a decoded weight is exact; each product x*w rounds once (relative 2^-24) and a
float32 sum of K terms adds at most K roundings of partial sums, so |ours - exact| <=
(K + 1) * 2^-24 * sum_i |x_i w_i| per output (checked element-wise and as <= 1e-5 of the output scale).
bf16 inputs: the bf16 x times the bf16-exact weights is exact in float32, so the same bound holds against
the exact product of the rounded inputs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import mxfp4
from gptoss_jax import platform as gptoss_platform
from gptoss_jax.kernels import mxfp4_gmm
from gptoss_jax.layers.moe import experts_forward, kernel_choice

E, K, N, BSZ = 3, 64, 32, 16
U = 2.0 ** -24


def _weights(rng, e=E, n=N, k=K):
    blocks = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(120, 132, (e, n, k // 32), dtype=np.uint8)
    return jnp.asarray(blocks), jnp.asarray(scales)


def _exact(a, w, block_expert, transposed):
    """float64 products of each block of rows with its expert's dense weight (zero for padding blocks)."""
    a = np.asarray(a, np.float64)
    out = []
    for b, eid in enumerate(np.asarray(block_expert)):
        rows = a[b * BSZ:(b + 1) * BSZ]
        if eid >= w.shape[0]:
            out.append((np.zeros((BSZ, w.shape[2] if transposed else w.shape[1])), np.zeros(1)))
            continue
        m = w[eid] if transposed else w[eid].T  # [N, K] -> dx: rows @ W; y: rows @ W^T
        out.append((rows @ m, np.abs(rows) @ np.abs(m)))
    return np.concatenate([o for o, _ in out]), np.concatenate([np.broadcast_to(s, o.shape) for o, s in out])


@pytest.mark.parametrize("backend,layout", [*((b, "checkpoint") for b in mxfp4_gmm.BACKENDS), (mxfp4_gmm.TPU, "tpu")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_matches_exact_products(backend, layout, dtype, transposed):
    """layout 'tpu': the TPU kernel on weights stored in :func:`mxfp4.to_tpu`'s layout (as loaded on TPU)."""
    rng = np.random.default_rng(0)
    blocks, scales = _weights(rng)
    w = mxfp4.unpack_np(blocks, scales, np.float64)  # [E, N, K]
    if layout == "tpu":
        blocks, scales = mxfp4.to_tpu(blocks, scales)
    block_expert = jnp.array([0, 2, 2, 3], jnp.int32)  # expert 1 empty, a padding block (id E) last
    a = jnp.asarray(rng.standard_normal((4 * BSZ, N if transposed else K)), jnp.float32).astype(dtype)
    fn = mxfp4_gmm.gmm_t if transposed else mxfp4_gmm.gmm
    ours = np.asarray(fn(a, blocks, scales, block_expert, bsz=BSZ, backend=backend, interpret=True))
    exact, scale = _exact(np.asarray(a.astype(jnp.float32)), w, block_expert, transposed)
    terms = a.shape[1]
    assert np.all(np.abs(ours - exact) <= (terms + 1) * U * scale)
    assert np.abs(ours - exact).max() <= 1e-5 * np.abs(exact).max()
    assert np.all(ours[3 * BSZ:] == 0)  # the padding block reads nothing and writes zeros


@pytest.mark.parametrize("k,slabs", [(192, 3), (96, 1)])
def test_tpu_kernel_reads_slabs_and_padded_contractions(k, slabs):
    """The TPU kernel on TPU-layout weights takes its rows as slabs [S, M, K/S] (the fused gate_up's output
    form, :func:`mxfp4_gmm.slabs`) as well as [M, K], within the float32 bound of the exact products; K = 96
    is padded to 128 in the words (zero codes) and the transposed product returns the real 96 columns.
    The gradient through the slabs is the slabs of the row-major one (the same transposed product)."""
    rng = np.random.default_rng(3)
    blocks, scales = _weights(rng, k=k)
    w = mxfp4.unpack_np(blocks, scales, np.float64)
    words, st = mxfp4.to_tpu(blocks, scales)
    assert mxfp4.dims(words.shape, st.shape) == (N, -(-k // 64) * 64)
    block_expert = jnp.array([0, 2, 2, 3], jnp.int32)
    a = jnp.asarray(rng.standard_normal((4 * BSZ, k)), jnp.float32)
    exact, scale = _exact(np.asarray(a), w, block_expert, False)
    kw = dict(bsz=BSZ, backend=mxfp4_gmm.TPU, interpret=True)
    for x in (a, mxfp4_gmm.slabs(a, slabs)):
        ours = np.asarray(mxfp4_gmm.gmm(x, words, st, block_expert, **kw))
        assert np.all(np.abs(ours - exact) <= (k + 1) * U * scale) and np.all(ours[3 * BSZ:] == 0)
    dy = jnp.asarray(rng.standard_normal((4 * BSZ, N)), jnp.float32)
    dx = np.asarray(mxfp4_gmm.gmm_t(dy, words, st, block_expert, k=k, **kw))
    exact_t, scale_t = _exact(np.asarray(dy), w, block_expert, True)
    assert dx.shape == (4 * BSZ, k) and np.all(np.abs(dx - exact_t) <= (N + 1) * U * scale_t)
    f = lambda x: jnp.sum(mxfp4_gmm.grouped_matmul(x, words, st, block_expert, BSZ, mxfp4_gmm.TPU, True, None, None,  # noqa: E731
                                                   jnp.float32) * dy)
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(mxfp4_gmm.slabs(a, slabs))),
                                  np.asarray(mxfp4_gmm.slabs(jax.grad(f)(a), slabs)))
    with pytest.raises(ValueError, match="multiple of 64"):
        mxfp4_gmm.gmm(mxfp4_gmm.slabs(a, 6 if k == 192 else 3), words, st, block_expert, **kw)


def test_gpu_kernel_rejects_the_tpu_layout():
    blocks, scales = mxfp4.to_tpu(*_weights(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="TPU kernel only"):
        mxfp4_gmm.gmm(jnp.zeros((2 * BSZ, K)), blocks, scales, jnp.zeros(2, jnp.int32), bsz=BSZ, backend="gpu")


@pytest.mark.parametrize("path,kernel", [("gather", "off"), ("grouped", "off"), (None, "interpret")])
def test_tpu_layout_experts_equal_the_checkpoint_layout(path, kernel):
    """experts_forward on experts in the TPU layout (gather: matvec_tpu; grouped scan: unpack_tpu; the TPU
    kernel on the stored words, which one token also takes, with the bias added inside the kernel) equals
    the checkpoint layout's exact path, values and gradients in x and the biases."""
    rng = np.random.default_rng(4)
    experts = _moe_experts(rng)
    tpu = dict(experts)
    for name in ("gate_up", "down"):
        tpu[f"{name}_blocks"], tpu[f"{name}_scales"] = mxfp4.to_tpu(experts[f"{name}_blocks"], experts[f"{name}_scales"])
    for ids in ([[2, 0]], [[1, 3], [3, 4], [1, 2]]):
        ids = jnp.asarray(ids, jnp.int32)
        x = jnp.asarray(rng.standard_normal((ids.shape[0], 64)) * 0.05, jnp.float32)
        weights = jax.nn.softmax(jnp.asarray(rng.standard_normal(ids.shape), jnp.float32), -1)
        biases = {k: v for k, v in experts.items() if k.endswith("_bias")}

        def loss(x, biases, weights_, path_, kernel_):
            y = experts_forward(x, ids, weights, {**weights_, **biases}, 4, 1.702, 7.0, path_, kernel=kernel_)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

        (_, want), g_want = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, biases, experts, "grouped", "off")
        if kernel == "interpret":  # a single token too
            assert "mxfp4_gmm_fwd" in str(jax.make_jaxpr(lambda x: loss(x, biases, tpu, path, kernel))(x))
        (_, got), g_got = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, biases, tpu, path, kernel)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
        assert float(jnp.abs(want).max()) > 0


@pytest.mark.parametrize("backend", [mxfp4_gmm.CPU, mxfp4_gmm.GPU])
@pytest.mark.parametrize("block_expert", [[3, 3, 3], [1, 1, 1, 3], [0, 1, 2], [0, 0, 2, 2, 2, 3, 3]])
def test_kernel_runs_visit_every_real_block_and_zero_the_padding(backend, block_expert):
    """The CPU loops and the GPU programs go over runs of blocks of one expert (one GPU program per expert
    and N tile, or K group, looping over its blocks): no real block at all, one expert over every real
    block, one block per expert, and runs of 2 and 3 blocks then 2 padding blocks, against the exact
    products; padding blocks are zero (the GPU interpreter starts its output buffer as NaN)."""
    rng = np.random.default_rng(6)
    blocks, scales = _weights(rng)
    w = mxfp4.unpack_np(blocks, scales, np.float64)
    be = jnp.asarray(block_expert, jnp.int32)
    for fn, width, transposed in ((mxfp4_gmm.gmm, K, False), (mxfp4_gmm.gmm_t, N, True)):
        a = jnp.asarray(rng.standard_normal((be.shape[0] * BSZ, width)), jnp.float32)
        ours = np.asarray(fn(a, blocks, scales, be, bsz=BSZ, backend=backend, interpret=True))
        exact, scale = _exact(np.asarray(a), w, be, transposed)
        assert np.all(np.abs(ours - exact) <= (width + 1) * U * scale)
        assert np.all(ours[np.repeat(np.asarray(block_expert) >= E, BSZ)] == 0)


def test_expert_spans():
    spans = mxfp4_gmm._expert_spans(jnp.asarray([0, 0, 2, 2, 2, 3, 3], jnp.int32), 3)
    np.testing.assert_array_equal(np.asarray(spans), [[0, 2, 2, 5], [2, 2, 5, 7]])  # expert 1 empty
    spans = mxfp4_gmm._expert_spans(jnp.asarray([1, 7], jnp.int32), 3)  # ids past E: padding
    np.testing.assert_array_equal(np.asarray(spans), [[0, 0, 1, 1], [0, 1, 1, 2]])


def test_kernel_rejects_mismatched_rows():
    blocks, scales = _weights(np.random.default_rng(0))
    with pytest.raises(ValueError, match="blocks x 16"):
        mxfp4_gmm.gmm(jnp.zeros((3 * BSZ, K)), blocks, scales, jnp.zeros(2, jnp.int32), bsz=BSZ, backend="tpu")
    with pytest.raises(ValueError, match="unknown MXFP4 kernel backend"):
        mxfp4_gmm.gmm(jnp.zeros((2 * BSZ, K)), blocks, scales, jnp.zeros(2, jnp.int32), bsz=BSZ, backend="bogus")


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("GPTOSS_MOE_KERNEL", raising=False)
    assert kernel_choice(platform="cpu") == ("cpu", False)
    assert kernel_choice("off", platform="cpu") is None
    assert kernel_choice(platform="tpu") == ("tpu", False)
    assert kernel_choice(platform="cuda") == ("gpu", False)
    with gptoss_platform.lowering_for("tpu"):  # an entry point tracing for a TPU
        assert kernel_choice() == ("tpu", False)
    assert kernel_choice("interpret") == ("tpu", True)
    monkeypatch.setenv("GPTOSS_MOE_KERNEL", "interpret-gpu")
    assert kernel_choice(platform="tpu") == ("gpu", True)
    with pytest.raises(ValueError, match="GPTOSS_MOE_KERNEL='bogus'"):
        kernel_choice("bogus")


def _moe_experts(rng, h=64, i=32, e=4, rank=0):
    """Random packed experts dict (gate_up [E, 2I, H], down [E, H, I]) with optional LoRA of ``rank``."""
    out = {}
    for name, (n, k) in {"gate_up": (2 * i, h), "down": (h, i)}.items():
        out[f"{name}_blocks"], out[f"{name}_scales"] = _weights(rng, e, n, k)
        out[f"{name}_bias"] = jnp.asarray(rng.standard_normal((e, n)) * 0.1, jnp.float32)
        if rank:
            out[f"{name}_lora_a"] = jnp.asarray(rng.standard_normal((e, k, rank)) * 0.1, jnp.float32)
            out[f"{name}_lora_b"] = jnp.asarray(rng.standard_normal((e, rank, n)) * 0.1, jnp.float32)
    return out


ROUTINGS = {  # ids [N, k=2] over 4 experts; 4 = an empty slot (expert held by another device)
    "one token": [[1, 3]],
    "all on one expert": [[2, 4]] * 5,
    "uneven, expert 0 empty": [[1, 2], [1, 3], [1, 2], [3, 1], [1, 4], [2, 1], [1, 3]] * 3,
}


@pytest.mark.parametrize("mode,routing", [
    ("interpret-gpu", "uneven, expert 0 empty"), *(("cpu", r) for r in ROUTINGS),
    *(pytest.param(m, r, marks=pytest.mark.slow) for m in ("interpret", "interpret-gpu") for r in ROUTINGS
      if (m, r) != ("interpret-gpu", "uneven, expert 0 empty"))])
def test_experts_forward_through_the_kernel_matches_the_scan(mode, routing):
    """Values and gradients (x and the LoRA factors) of the kernel path equal the block-grouped scan's.
    Both sum the same float32 products in different orders; bound as above with the MoE's scale."""
    rng = np.random.default_rng(1)
    experts = _moe_experts(rng, rank=4)
    ids = jnp.asarray(ROUTINGS[routing], jnp.int32)
    x = jnp.asarray(rng.standard_normal((ids.shape[0], 64)) * 0.05, jnp.float32)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal(ids.shape), jnp.float32), -1)

    def loss(x, lora, kernel):
        y = experts_forward(x, ids, weights, {**experts, **lora}, 4, 1.702, 7.0, "grouped", kernel=kernel)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    lora = {k: v for k, v in experts.items() if "_lora_" in k}
    (_, y_ref), g_ref = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, lora, "off")
    (_, y), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, lora, mode)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    assert float(jnp.abs(y_ref).max()) > 0


@pytest.mark.slow
def test_decode_with_a_kernel_takes_the_grouped_path():
    """With a kernel, few tokens also go through the grouped kernel (one read per selected expert)."""
    rng = np.random.default_rng(2)
    experts = _moe_experts(rng)
    ids = jnp.asarray([[1, 3], [3, 1]], jnp.int32)
    x = jnp.asarray(rng.standard_normal((2, 64)) * 0.05, jnp.float32)
    weights = jnp.full(ids.shape, 0.5, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x: experts_forward(x, ids, weights, experts, 4, 1.702, 7.0, kernel="interpret-gpu"))(x)
    assert "mxfp4_gmm_fwd" in str(jaxpr)  # not the gather path
    gathered = experts_forward(x, ids, weights, experts, 4, 1.702, 7.0, "gather", kernel="off")
    ours = experts_forward(x, ids, weights, experts, 4, 1.702, 7.0, kernel="interpret-gpu")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(gathered), rtol=0, atol=1e-5 * float(jnp.abs(gathered).max()))


@pytest.mark.parametrize("mode", ["interpret-gpu", "interpret"])
def test_single_token_with_a_kernel_takes_the_gather_path(mode):
    """One token's k experts are distinct: with a kernel it still takes the gather path (each selected
    expert read once by its own matrix-vector product, no padding blocks), with the same output."""
    rng = np.random.default_rng(3)
    experts = _moe_experts(rng)
    ids = jnp.asarray([[2, 0]], jnp.int32)
    x = jnp.asarray(rng.standard_normal((1, 64)) * 0.05, jnp.float32)
    weights = jnp.asarray([[0.7, 0.3]], jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x: experts_forward(x, ids, weights, experts, 4, 1.702, 7.0, kernel=mode))(x))
    assert "mxfp4_gmm_fwd" not in jaxpr
    grouped = experts_forward(x, ids, weights, experts, 4, 1.702, 7.0, "grouped", kernel=mode)
    ours = experts_forward(x, ids, weights, experts, 4, 1.702, 7.0, kernel=mode)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(grouped), rtol=0, atol=1e-5 * float(jnp.abs(grouped).max()))


@pytest.mark.parametrize("backend", mxfp4_gmm.BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_bias_and_output_dtype_equal_the_sum_outside(backend, dtype):
    """``bias`` and ``out_dtype`` inside the kernel: the same float32 sum and one rounding as adding the bias
    to the float32 output outside, bit for bit; padding blocks stay zero."""
    rng = np.random.default_rng(4)
    blocks, scales = _weights(rng)
    block_expert = jnp.array([0, 2, 2, 3], jnp.int32)
    bias = jnp.asarray(rng.standard_normal((E, N)), jnp.float32).astype(dtype)
    x = jnp.asarray(rng.standard_normal((4 * BSZ, K)), jnp.float32).astype(dtype)
    kw = dict(bsz=BSZ, backend=backend, interpret=True)
    plain = mxfp4_gmm.gmm(x, blocks, scales, block_expert, **kw)
    outside = (plain + jnp.take(bias, block_expert, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
               .repeat(BSZ, axis=0)).astype(dtype)
    ours = mxfp4_gmm.gmm(x, blocks, scales, block_expert, bias=bias, out_dtype=dtype, **kw)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), np.asarray(outside.astype(jnp.float32)))
    assert np.all(np.asarray(ours[3 * BSZ:].astype(jnp.float32)) == 0)
    with pytest.raises(ValueError, match="bias"):
        mxfp4_gmm.gmm(x, blocks, scales, block_expert, bias=bias[:, :8], **kw)


@pytest.mark.parametrize("mode", ["interpret-gpu", pytest.param("interpret", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_experts_forward_kernel_bias_inside_equals_bias_outside(mode, dtype):
    """Without LoRA the kernel path adds the bias inside the kernel and returns x's dtype; with zero LoRA
    adapters it takes the float32 output and adds the bias outside (the path before). Same values, bit for
    bit; gradients (x, the biases) equal the block-grouped scan's to float32 rounding."""
    rng = np.random.default_rng(5)
    experts = _moe_experts(rng)
    experts = {k: v.astype(dtype) if k.endswith("_bias") else v for k, v in experts.items()}
    zero_lora = {f"{n}_lora_{ab}": jnp.zeros(shape, dtype) for n, (k, o) in {"gate_up": (64, 64), "down": (32, 64)}.items()
                 for ab, shape in (("a", (4, k, 2)), ("b", (4, 2, o)))}
    ids = jnp.asarray(ROUTINGS["uneven, expert 0 empty"], jnp.int32)
    x = jnp.asarray(rng.standard_normal((ids.shape[0], 64)) * 0.05, jnp.float32).astype(dtype)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal(ids.shape), jnp.float32), -1).astype(dtype)
    run = lambda ex, kernel: experts_forward(x, ids, weights, ex, 4, 1.702, 7.0, "grouped", kernel=kernel)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda: run(experts, mode))())
    assert "mxfp4_gmm_fwd" in jaxpr
    fused, before = run(experts, mode), run({**experts, **zero_lora}, mode)
    assert fused.dtype == dtype
    np.testing.assert_array_equal(np.asarray(fused.astype(jnp.float32)), np.asarray(before.astype(jnp.float32)))
    if dtype != jnp.float32:
        return

    def loss(x, biases, kernel):
        y = experts_forward(x, ids, weights, {**experts, **biases}, 4, 1.702, 7.0, "grouped", kernel=kernel)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

    biases = {k: v for k, v in experts.items() if k.endswith("_bias")}
    g_ref = jax.grad(loss, (0, 1))(x, biases, "off")
    g = jax.grad(loss, (0, 1))(x, biases, mode)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("n,layout", [(64, "checkpoint"), (1280, "tpu")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gmm_swiglu_equals_gmm_bias_then_swiglu(n, layout, dtype):
    """SwiGLU in the gate_up kernel's epilogue (:func:`mxfp4_gmm.gmm_swiglu`) against the unfused kernel and
    :func:`moe.swiglu` on its [rows, 2I] output: bit for bit (the same float32 sums, roundings and math; the
    even lanes are only moved). n 1280: two N tiles of 640 (the 20b gate_up's tile), 9 packing steps each;
    block 1 of expert 2 holds one real row, expert 1 is empty, the last block pads."""
    from gptoss_jax.layers.moe import swiglu

    x, blocks, scales, bias, block_expert = _swiglu_case(n, layout, dtype)
    kw = dict(bsz=BSZ, interpret=True, rows=2 * BSZ + 1)
    ours = mxfp4_gmm.gmm_swiglu(x, blocks, scales, bias, block_expert, BSZ, 1.702, 7.0, True, 2 * BSZ + 1)
    want = swiglu(mxfp4_gmm.gmm_bias(x, blocks, scales, bias, block_expert, **kw), 1.702, 7.0)
    assert ours.dtype == dtype and ours.shape == (4 * BSZ, n // 2)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    assert np.all(np.asarray(ours[3 * BSZ:].astype(jnp.float32)) == 0) and float(jnp.abs(want).max()) > 0
    with pytest.raises(ValueError, match="SwiGLU: bias"):
        mxfp4_gmm.gmm_swiglu(x, blocks, scales, bias[:, :8], block_expert, BSZ, 1.702, 7.0, True)


def _swiglu_case(n, layout, dtype):
    """(x [4 blocks x BSZ, K], gate_up blocks, scales, bias [E, n], block_expert) for the fused SwiGLU tests."""
    rng = np.random.default_rng(7)
    blocks, scales = _weights(rng, n=n)
    if layout == "tpu":
        blocks, scales = mxfp4.to_tpu(blocks, scales)
    block_expert = jnp.array([0, 2, 2, 3], jnp.int32)
    bias = jnp.asarray(rng.standard_normal((E, n)), jnp.float32).astype(dtype)
    x = jnp.asarray(rng.standard_normal((4 * BSZ, K)) * 0.5, jnp.float32)
    x = x.at[2 * BSZ + 1:3 * BSZ].set(0).astype(dtype)  # block 2: one real row, the rest zero padding rows
    return x, blocks, scales, bias, block_expert


@pytest.mark.slow
def test_gmm_swiglu_gradients_equal_the_unfused_path():
    """Gradients in x and the bias of :func:`mxfp4_gmm.gmm_swiglu` equal gmm_bias + swiglu's bit for bit
    (the backward recomputes the unfused path)."""
    from gptoss_jax.layers.moe import swiglu

    x, blocks, scales, bias, block_expert = _swiglu_case(64, "checkpoint", jnp.float32)
    cot = jnp.cos(jnp.arange(4 * BSZ * 32, dtype=jnp.float32).reshape(4 * BSZ, 32))
    g = jax.grad(lambda x, b: jnp.sum(mxfp4_gmm.gmm_swiglu(x, blocks, scales, b, block_expert, BSZ, 1.702, 7.0, True)
                                      * cot), (0, 1))(x, bias)
    g_ref = jax.grad(lambda x, b: jnp.sum(swiglu(mxfp4_gmm.gmm_bias(x, blocks, scales, b, block_expert, bsz=BSZ,
                                                                    interpret=True), 1.702, 7.0) * cot), (0, 1))(x, bias)
    for got, exp in zip(g, g_ref):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
        assert float(jnp.abs(exp).max()) > 0


@pytest.mark.parametrize("routing", [r if r == "uneven, expert 0 empty" else pytest.param(r, marks=pytest.mark.slow)
                                     for r in ROUTINGS])
def test_fused_swiglu_tpu_layout_equals_unfused_checkpoint_layout(routing):
    """experts_forward on TPU-layout experts (both projections in block order, SwiGLU fused into the gate_up
    kernel, the k outputs combined by :func:`moe._combine_elementwise`) against the checkpoint layout through
    the same kernel unfused (gate_up [rows, 2I], then :func:`moe.swiglu`, then down, then the einsum over k):
    bit for bit on CPU, bf16, for one token, one expert, and uneven groups. (The combine's k = 2 float32
    products and one add are the einsum's; on TPU the dot's summation order is the compiler's.)"""
    rng = np.random.default_rng(8)
    experts = {k: v.astype(jnp.bfloat16) if k.endswith("_bias") else v for k, v in _moe_experts(rng).items()}
    tpu = dict(experts)
    for name in ("gate_up", "down"):
        tpu[f"{name}_blocks"], tpu[f"{name}_scales"] = mxfp4.to_tpu(experts[f"{name}_blocks"], experts[f"{name}_scales"])
    ids = jnp.asarray(ROUTINGS[routing], jnp.int32)
    x = jnp.asarray(rng.standard_normal((ids.shape[0], 64)) * 0.5, jnp.bfloat16)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal(ids.shape), jnp.float32), -1).astype(jnp.bfloat16)
    run = lambda ex: experts_forward(x, ids, weights, ex, 4, 1.702, 7.0, "grouped", kernel="interpret")  # noqa: E731
    assert "mxfp4_gmm_fwd" in str(jax.make_jaxpr(lambda: run(tpu))())
    want, got = run(experts), run(tpu)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    assert float(jnp.abs(want.astype(jnp.float32)).max()) > 0
