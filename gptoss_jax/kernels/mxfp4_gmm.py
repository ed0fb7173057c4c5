"""Grouped matmul on packed MXFP4 experts, decoded inside the kernel (Pallas: Mosaic TPU and Triton GPU;
plain-JAX loops on CPU).

Rows come in blocks of ``bsz``; block ``b`` belongs to expert ``block_expert[b]`` (an id >= E marks a
padding block: zero output, nothing read). Weights stay packed in HBM: ``blocks`` u8 [E, N, K/32, 16],
``scales`` u8 [E, N, K/32] (the checkpoint layout, see :mod:`gptoss_jax.mxfp4`); each kernel step
decodes its weight tile (E2M1 codes and E8M0 scales, integer arithmetic) to the activation dtype in
VMEM / registers and feeds the matrix unit. Nothing dense of the weights is ever written to HBM.

- :func:`gmm`: ``y[b] = x[b] @ W_e^T``  x [nb*bsz, K] -> float32 [nb*bsz, N]; with ``bias`` [E, N] and
  ``out_dtype``: ``(x[b] @ W_e^T + bias[e]).astype(out_dtype)`` (the float32 sum rounded once, as the
  same sum outside would be; a bf16 output halves the [rows, N] buffer a prefill keeps live);
- :func:`gmm_t`: ``dx[b] = dy[b] @ W_e`` dy [nb*bsz, N] -> float32 [nb*bsz, K] (the product for dx);
- :func:`grouped_matmul`: :func:`gmm` with a custom VJP whose dx is :func:`gmm_t` (weights are frozen;
  the bias gets its per-expert sum of dy);
- :func:`gmm_bias`: :func:`grouped_matmul` with the bias added inside and the output in x's dtype;
- :func:`gmm_swiglu` (TPU): gate_up with its bias and the clamped SwiGLU in the kernel's epilogue
  (interleaved gate / up columns [.., 2I] -> [.., I]: each N tile's even lanes packed by lane rotations).

TPU weights may come in the TPU layout (:func:`gptoss_jax.mxfp4.to_tpu`: words u32 [E, Kp/8, N], scales
u8 [E, K/32 rounded up to 32, N], N minor, stored so at load time) instead of the checkpoint's u8 blocks,
which the TPU kernel converts to that layout inside each call (a full pass over all experts' bytes).

Decoding without in-kernel gathers. TPU: nibble j of word row 8t + r holds value 64t + 8j + r, so the 8
decoded planes of a tile of word rows stack into the weight matrix in natural order by moving whole
(8, 128) tiles, and the kernel reads activation rows [bsz, K] as they are (or the slabs [S, bsz, K/S] the
fused gate_up + SwiGLU writes, :func:`slabs`: no relayout between the projections); each scale row is
broadcast to its 8 word rows (even blocks' scales first, then the odd ones'). GPU and CPU: a weight byte
holds 2 codes, element ``2w + j`` of the row in nibble j; the activations are split outside the kernel
into 2 strided planes ``x[:, j::2]``, so ``x @ W^T = sum_j x_j @ W_j^T`` where W_j holds code j of each
byte, decoded in place. Products and sums are those of a float32 (or bf16-in, float32-accumulate)
matmul, so results match the exact path up to summation order.

TPU grid (N tiles, row blocks) with the block axis innermost: consecutive blocks of one expert keep
the same weight block index, so Mosaic's pipeline does not fetch it again: each selected expert's
packed bytes are read once per call. GPU grid (E + 1, N tiles): the program of expert e (e = E: the
padding blocks) loops over e's consecutive blocks (:func:`_expert_spans`) and streams its expert's N tile
group by group (16 bytes = 32 values per step) for each block of its run in turn, so the tile's stripe
comes from HBM once per call and its repeats from L2 (loaded 'evict_last'). CPU: a loop over the experts that own
blocks decodes each once per call into its two nibble planes (the same plane split of the activations),
and an inner loop over that expert's blocks runs their products; no padding block is computed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from gptoss_jax import mxfp4

TPU = "tpu"
GPU = "gpu"
CPU = "cpu"
BACKENDS = (TPU, GPU, CPU)


def _e8m0(s: jax.Array) -> jax.Array:
    """E8M0 exponents (int32 0..254) -> float32 2**(s-127), by building the bits (s = 0: subnormal 2^-127)."""
    return jax.lax.bitcast_convert_type(jnp.where(s == 0, 1 << 22, s << 23), jnp.float32)


def _codes(words: jax.Array, j: int) -> jax.Array:
    """Code j (4 bits) of each int32 word."""
    return (words >> (4 * j)) & 0xF


def _dot(a, b, contract, dtype):
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _planes(x: jax.Array, p: int) -> jax.Array:
    """x [M, K] -> [p, M, K/p] with plane j = x[:, j::p]."""
    m, k = x.shape
    return jnp.moveaxis(x.reshape(m, k // p, p), -1, 0)


def _unplanes(planes: jax.Array) -> jax.Array:
    """[p, M, K/p] -> [M, K] (inverse of :func:`_planes`)."""
    p, m, w = planes.shape
    return jnp.moveaxis(planes, 0, -1).reshape(m, w * p)


def _dma_indices(block_expert: jax.Array, num_experts: int):
    """Per block: (expert whose weights to fetch, row block to fetch). Padding blocks repeat the last
    real block's indices, so the pipeline fetches nothing for them."""
    nb = block_expert.shape[0]
    valid = block_expert < num_experts
    last = jax.lax.cummax(jnp.where(valid, jnp.arange(nb, dtype=jnp.int32), 0))
    return block_expert[last].clip(0, num_experts - 1).astype(jnp.int32), last.astype(jnp.int32)


# ---------------------------------------------------------------- TPU (Mosaic)

def tpu_words(blocks: jax.Array, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The TPU kernel's weight form: (words u32 [E, Kp/8, N], scales u8 [E, Gp, N]) (:func:`mxfp4.to_tpu`);
    weights already in it are returned as they are. TPU HBM layouts keep the output dim N in the lanes
    for these shapes (no padding); the u8 [E, N, G, 16] checkpoint blocks are converted in the call."""
    return (blocks, scales) if mxfp4.is_tpu(blocks) else mxfp4.to_tpu(blocks, scales)


def _tpu_word_scales(s_ref) -> tuple[jax.Array, jax.Array]:
    """The tile's scales u8 [1, Gp, tn] (TPU layout: even blocks, then odd) -> the float32 scale of every word
    row's nibbles 0-3 and of its nibbles 4-7, each [Gp/2 * 8, tn]: each scale row broadcast to the 8 word
    rows (one sublane tile) of its group."""
    sc = _e8m0(s_ref[0].astype(jnp.int32))  # [Gp, tn]
    gh, tn = sc.shape[0] // 2, sc.shape[1]
    return tuple(jnp.broadcast_to(sc[h * gh:(h + 1) * gh][:, None, :], (gh, mxfp4.WORD, tn)).reshape(gh * mxfp4.WORD, tn)
                 for h in range(2))


def _tpu_dense(w_ref, scales, r0: int, nr: int, dtype) -> jax.Array:
    """Word rows [r0, r0 + nr) of the tile (multiples of 8) decoded -> [8 * nr, tn] ``dtype``: values
    8*r0 .. 8*(r0 + nr) - 1 of the contraction in natural order. Nibble j of word row 8t + r is value
    64t + 8j + r (:func:`mxfp4.to_tpu`), so the 8 decoded planes [nr, tn] stack into the matrix by moving
    whole (8, 128) tiles: [nr/8, 8, tn] each, stacked on axis 1, then merged."""
    words = jax.lax.bitcast_convert_type(w_ref[0, r0:r0 + nr, :], jnp.int32)  # [nr, tn]
    lo, hi = (s[r0:r0 + nr] for s in scales)
    tn = words.shape[1]
    planes = [(mxfp4.e2m1_values(_codes(words, j)) * (lo if j < 4 else hi)).reshape(nr // 8, 1, 8, tn)
              for j in range(mxfp4.WORD)]
    return jnp.concatenate(planes, axis=1).reshape(nr * mxfp4.WORD, tn).astype(dtype)


def clamped_swiglu(gate: jax.Array, up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """float32 gate, up [...] -> float32 gate' * sigmoid(alpha * gate') * (up' + 1), gate' = min(gate, limit),
    up' = clip(up, -limit, limit) (:func:`gptoss_jax.layers.moe.swiglu`'s math)."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)


def _roll_left(v: jax.Array, s: int) -> jax.Array:
    """v [M, n] -> lane p holds v[:, (p + s) % n] (a lane rotation)."""
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.roll(v, v.shape[1] - s, 1)


def _swiglu_tile(acc: jax.Array, dtype, alpha: float, limit: float) -> jax.Array:
    """The epilogue of the fused gate_up: float32 [M, tn] interleaved (gate in even lanes, up in odd) ->
    [M, tn/2] dtype. The tile is rounded to ``dtype`` first (the unfused path's [rows, 2I] output), SwiGLU
    runs in float32 on every even lane with its odd neighbour, then the even lanes are packed to the front
    by log2(tn/2) rotate-and-select steps (data movement only: values are not touched) and rounded once."""
    tn = acc.shape[1]
    v = acc.astype(dtype).astype(jnp.float32)
    h = clamped_swiglu(v, _roll_left(v, 1), alpha, limit)  # lane 2i: pair i's value; odd lanes: unused
    lane = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 1)
    s = 1
    while s < tn // 2:
        # pair i = q*s + r (r < s) sits at lane q*2s + r; those with odd q move s lanes left, into lanes of
        # the form (even q')*2s + s + r that hold no pair
        h = jnp.where(((lane & s) != 0) & ((lane & 2 * s) == 0), _roll_left(h, s), h)
        s *= 2
    return h[:, :tn // 2].astype(dtype)


def _tpu_fwd_kernel(be_ref, eid_ref, xb_ref, x_ref, w_ref, s_ref, *refs, num_experts, dtype, activation=None):
    *b_ref, o_ref = refs  # b_ref: [the bias tile [1, 1, tn]] or []

    @pl.when(be_ref[pl.program_id(1)] < num_experts)
    def _():
        scales = _tpu_word_scales(s_ref)
        slabs, width = x_ref.shape[0], x_ref.shape[2]  # x block [S, bsz, K/S]: slab s holds values s*K/S ..
        nr = mxfp4.tpu_word_rows(width)
        acc = jnp.zeros((x_ref.shape[1], w_ref.shape[-1]), jnp.float32)
        for s in range(slabs):
            w = _tpu_dense(w_ref, scales, s * nr, nr, dtype)
            acc += _dot(x_ref[s], w if w.shape[0] == width else w[:width], ((1,), (0,)), dtype)
        if b_ref:  # the block's expert's bias [1, tn], added in float32, then one rounding
            acc += b_ref[0][0].astype(jnp.float32)
        if activation is None:
            o_ref[...] = acc.astype(o_ref.dtype)
        else:  # (alpha, limit): SwiGLU of the tile's pairs, out block [1, bsz, tn/2]
            o_ref[0] = _swiglu_tile(acc, o_ref.dtype, *activation)

    @pl.when(be_ref[pl.program_id(1)] >= num_experts)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _tpu_bwd_kernel(be_ref, eid_ref, xb_ref, dy_ref, w_ref, s_ref, o_ref, *, num_experts, dtype):
    @pl.when(pl.program_id(1) == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(be_ref[pl.program_id(0)] < num_experts)
    def _():
        k = o_ref.shape[1]
        w = _tpu_dense(w_ref, _tpu_word_scales(s_ref), 0, w_ref.shape[1], dtype)
        o_ref[...] += _dot(dy_ref[...], w if w.shape[0] == k else w[:k], ((1,), (1,)), dtype)


def _tile(n: int, cap: int = 1024) -> int:
    """Largest multiple of 128 dividing n and <= cap; n itself when there is none (a full-width tile)."""
    return max([t for t in range(128, min(n, cap) + 1, 128) if n % t == 0], default=n)


def _tpu_call(kind, a, blocks, scales, block_expert, bsz, dtype, interpret, rows=None, bias=None,
              out_dtype=jnp.float32, activation=None, k=None):
    """fwd: a [M, K] or slabs [S, M, K/S] (:func:`slabs`); bwd: dy [M, N] -> float32 [M, k]. With
    ``activation`` the output is the SwiGLU slabs [N/tn, M, tn/2]."""
    from jax.experimental.pallas import tpu as pltpu

    words, scales = tpu_words(blocks, scales)
    e, w, n = words.shape
    g = scales.shape[1]  # the scale rows (blocks padded to a multiple of 32)
    nb = block_expert.shape[0]
    tn = _tile(n)
    eid, xblk = _dma_indices(block_expert, e)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=100 * 2**20)
    if kind == "fwd":
        x = a.astype(dtype)
        x = x[None] if x.ndim == 2 else x  # [S, M, K/S]
        k = x.shape[0] * x.shape[2]
        grid = (n // tn, nb)
        in_specs = [pl.BlockSpec((x.shape[0], bsz, x.shape[2]), lambda j, b, be, ei, xb: (0, xb[b], 0)),
                    pl.BlockSpec((1, w, tn), lambda j, b, be, ei, xb: (ei[b], 0, j)),
                    pl.BlockSpec((1, g, tn), lambda j, b, be, ei, xb: (ei[b], 0, j))]
        if bias is not None:  # [E, 1, N]: the block's expert's row of each N tile
            in_specs.append(pl.BlockSpec((1, 1, tn), lambda j, b, be, ei, xb: (ei[b], 0, j)))
        if activation is None:
            out_spec = pl.BlockSpec((bsz, tn), lambda j, b, be, ei, xb: (b, j))
            out_shape = jax.ShapeDtypeStruct((nb * bsz, n), out_dtype)
        else:  # N tile j's tn/2 SwiGLU columns as slab j (tn/2 need not be a multiple of 128)
            out_spec = pl.BlockSpec((1, bsz, tn // 2), lambda j, b, be, ei, xb: (j, b, 0))
            out_shape = jax.ShapeDtypeStruct((n // tn, nb * bsz, tn // 2), out_dtype)
        spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_spec)
        kernel = functools.partial(_tpu_fwd_kernel, num_experts=e, dtype=dtype, activation=activation)
        flops, nbytes = 2 * nb * bsz * n * k, x.size * x.dtype.itemsize * (n // tn)
    else:
        x = a.astype(dtype)  # dy [M, N]
        k = w * mxfp4.WORD if k is None else k
        grid = (nb, n // tn)
        spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=grid,
            in_specs=[pl.BlockSpec((bsz, tn), lambda b, j, be, ei, xb: (xb[b], j)),
                      pl.BlockSpec((1, w, tn), lambda b, j, be, ei, xb: (ei[b], 0, j)),
                      pl.BlockSpec((1, g, tn), lambda b, j, be, ei, xb: (ei[b], 0, j))],
            out_specs=pl.BlockSpec((bsz, k), lambda b, j, be, ei, xb: (b, 0)))
        kernel = functools.partial(_tpu_bwd_kernel, num_experts=e, dtype=dtype)
        out_shape = jax.ShapeDtypeStruct((nb * bsz, k), jnp.float32)
        flops, nbytes = 2 * nb * bsz * n * k, x.size * x.dtype.itemsize
    # weights: forward fetches each selected expert once (at most min(E, blocks, real rows)); the transposed
    # product once per block
    fetched = min(e, nb, rows or nb) if kind == "fwd" else nb
    nbytes += (words.size * 4 + scales.size) // e * fetched + out_shape.size * jnp.dtype(out_shape.dtype).itemsize
    return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=spec, compiler_params=params,
                          interpret=interpret, name=f"mxfp4_gmm_{kind}",
                          cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
                          )(block_expert.astype(jnp.int32), eid, xblk, x, words, scales,
                            *(() if bias is None else (bias.reshape(e, 1, n),)))


def slabs(x: jax.Array, s: int) -> jax.Array:
    """x [M, K] -> [s, M, K/s], slab i = columns i*K/s .. (i+1)*K/s - 1 (the form :func:`gmm_swiglu` returns
    with ``as_slabs`` and the TPU kernel reads as it is)."""
    m, k = x.shape
    return jnp.moveaxis(x.reshape(m, s, k // s), 1, 0)


def unslab(x: jax.Array) -> jax.Array:
    """[s, M, K/s] -> [M, K] (inverse of :func:`slabs`)."""
    s, m, w = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(m, s * w)


# ---------------------------------------------------------------- GPU (Triton)

def _gpu_group(blocks_ref, scales_ref, eid, rows_n, gi, dtype):
    """Group gi of rows ``rows_n`` of expert eid: the (low, high) nibble planes [tn, 16] in dtype. Loaded
    with L2 eviction priority 'evict_last': the program reads the same tile again for each further row
    block of its expert (the activations stream with the default policy)."""
    byte = pltr.load(blocks_ref.at[eid, rows_n, gi, :], eviction_policy="evict_last").astype(jnp.int32)  # [tn, 16]
    sc = _e8m0(pltr.load(scales_ref.at[eid, rows_n, gi], eviction_policy="evict_last").astype(jnp.int32))[:, None]
    return tuple((mxfp4.e2m1_values(_codes(byte, j)) * sc).astype(dtype) for j in range(2))


def _expert_spans(block_expert: jax.Array, num_experts: int) -> jax.Array:
    """Blocks sorted by expert (ids [nb], ascending, >= E: padding, last) -> int32 [2, E + 1]: per expert
    (then the padding, slot E) its first block and the block past its last (equal for an empty expert).
    One fused count and a cumulative sum: a few kernels per call, where compacting the runs (nonzero,
    searchsorted) added ~17 per projection to a GPU decode step."""
    slots = jnp.arange(num_experts + 1, dtype=jnp.int32)
    be = jnp.minimum(block_expert.astype(jnp.int32), num_experts)
    counts = jnp.sum(be[None, :] == slots[:, None], axis=1, dtype=jnp.int32)
    ends = jnp.cumsum(counts).astype(jnp.int32)
    return jnp.stack([ends - counts, ends])


def _gpu_expert_blocks(span_ref, num_experts, block, zeros):
    """Over the blocks of this program's expert (axis 0 of the grid: the experts, then the padding):
    ``block(b, expert)`` for each block b of a real expert, ``zeros(b)`` for each padding block."""
    eid = pl.program_id(0)
    start, end = span_ref[0, eid], span_ref[1, eid]

    @pl.when(eid < num_experts)
    def _():
        jax.lax.fori_loop(start, end, lambda b, c: (block(b, eid), c)[1], 0)

    @pl.when(eid >= num_experts)
    def _():
        jax.lax.fori_loop(start, end, lambda b, c: (zeros(b), c)[1], 0)


def _gpu_fwd_kernel(span_ref, x_ref, blocks_ref, scales_ref, *refs, num_experts, bsz, tn, dtype):
    *b_ref, o_ref = refs  # b_ref: [bias [E, N]] or []
    rows_n = pl.ds(pl.program_id(1) * tn, tn)

    def block(b, eid):
        rows = pl.ds(b * bsz, bsz)

        def step(gi, acc):
            lo, hi = _gpu_group(blocks_ref, scales_ref, eid, rows_n, gi, dtype)
            acc += _dot(x_ref[0, rows, gi, :], lo, ((1,), (1,)), dtype)
            return acc + _dot(x_ref[1, rows, gi, :], hi, ((1,), (1,)), dtype)

        acc = jax.lax.fori_loop(0, blocks_ref.shape[2], step, jnp.zeros((bsz, tn), jnp.float32))
        if b_ref:
            acc += b_ref[0][eid, rows_n].astype(jnp.float32)[None, :]
        o_ref[rows, rows_n] = acc.astype(o_ref.dtype)

    def zeros(b):
        o_ref[pl.ds(b * bsz, bsz), rows_n] = jnp.zeros((bsz, tn), o_ref.dtype)

    _gpu_expert_blocks(span_ref, num_experts, block, zeros)


def _gpu_bwd_kernel(span_ref, dy_ref, blocks_ref, scales_ref, o_ref, *, num_experts, bsz, tn, dtype):
    gi = pl.program_id(1)
    zero = jnp.zeros((bsz, 16), jnp.float32)

    def write(b, lo, hi):
        o_ref[0, pl.ds(b * bsz, bsz), gi, :] = lo
        o_ref[1, pl.ds(b * bsz, bsz), gi, :] = hi

    def block(b, eid):
        def step(nt, acc):
            rows_n = pl.ds(nt * tn, tn)
            lo, hi = _gpu_group(blocks_ref, scales_ref, eid, rows_n, gi, dtype)
            dy = dy_ref[pl.ds(b * bsz, bsz), rows_n]
            return acc[0] + _dot(dy, lo, ((1,), (0,)), dtype), acc[1] + _dot(dy, hi, ((1,), (0,)), dtype)

        write(b, *jax.lax.fori_loop(0, blocks_ref.shape[1] // tn, step, (zero, zero)))

    _gpu_expert_blocks(span_ref, num_experts, block, lambda b: write(b, zero, zero))


def _gpu_tile(n: int) -> int:
    """Largest power of two in [16, 64] dividing n."""
    for t in (64, 32, 16):
        if n % t == 0:
            return t
    raise ValueError(f"the GPU MXFP4 kernel needs output sizes divisible by 16, got {n}")


def _gpu_call(kind, a, blocks, scales, block_expert, bsz, dtype, interpret, rows=None, bias=None,
              out_dtype=jnp.float32):
    e, n, g, _ = blocks.shape
    spans = _expert_spans(block_expert, e)
    m = block_expert.shape[0] * bsz
    tn = _gpu_tile(n)
    params = pltr.CompilerParams(num_warps=4, num_stages=2)
    if kind == "fwd":
        x = _planes(a.astype(dtype), 2).reshape(2, m, g, 16)
        kernel = functools.partial(_gpu_fwd_kernel, num_experts=e, bsz=bsz, tn=tn, dtype=dtype)
        grid, out_shape = (e + 1, n // tn), jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        x = a.astype(dtype)
        kernel = functools.partial(_gpu_bwd_kernel, num_experts=e, bsz=bsz, tn=tn, dtype=dtype)
        grid, out_shape = (e + 1, g), jax.ShapeDtypeStruct((2, m, g, 16), jnp.float32)
    extra = () if bias is None else (bias,)
    out = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, compiler_params=params, interpret=interpret,
                         name=f"mxfp4_gmm_{kind}")(spans, x, blocks, scales, *extra)
    return out if kind == "fwd" else _unplanes(out.reshape(2, m, g * 16))


# ---------------------------------------------------------------- CPU (plain JAX loops)

def _cpu_planes(blocks: jax.Array, scales: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """One expert's u8 blocks [N, G, 16] and scales [N, G] -> its (low, high) nibble planes [N, G*16] in
    dtype: code j of each byte times its block's scale (two separate fusions: XLA:CPU emits a fused
    interleave or concatenation element by element, several times slower than each plane alone)."""
    n, g, _ = blocks.shape
    byte = blocks.astype(jnp.int32)
    sc = _e8m0(scales.astype(jnp.int32))[..., None]
    return tuple((mxfp4.e2m1_values(_codes(byte, j)) * sc).astype(dtype).reshape(n, g * 16) for j in range(2))


def _cpu_call(kind, a, blocks, scales, block_expert, bsz, dtype, interpret, rows=None, bias=None,
              out_dtype=jnp.float32):
    """The grouped product as two nested loops: over the experts that own blocks (in block order), each
    decoded once into its two nibble planes, and over that expert's blocks, one [bsz, K/2] x [K/2, N] product
    per plane written in place. Padding blocks are never visited (zeros); empty experts are never decoded."""
    del interpret, rows
    e, n, g, _ = blocks.shape
    nb = block_expert.shape[0]
    be = block_expert.astype(jnp.int32)
    real = be < e
    first = real & jnp.concatenate([jnp.ones((1,), bool), be[1:] != be[:-1]])  # each expert's first block
    starts = jnp.nonzero(first, size=min(e, nb), fill_value=nb)[0].astype(jnp.int32)
    ends = jnp.searchsorted(be, be[jnp.minimum(starts, nb - 1)], side="right").astype(jnp.int32)
    count = jnp.sum(first).astype(jnp.int32)
    if kind == "fwd":
        planes = _planes(a.astype(dtype), 2).reshape(2, nb, bsz, g * 16)
        out = jnp.zeros((nb, bsz, n), out_dtype)
    else:
        dy = a.astype(dtype).reshape(nb, bsz, n)
        out = jnp.zeros((2, nb, bsz, g * 16), jnp.float32)

    def expert(i, out):
        eid = be[starts[i]]
        lo, hi = _cpu_planes(blocks[eid], scales[eid], dtype)

        def block(b, out):
            if kind == "fwd":
                y = _dot(planes[0, b], lo, ((1,), (1,)), dtype) + _dot(planes[1, b], hi, ((1,), (1,)), dtype)
                if bias is not None:
                    y = y + bias[eid].astype(jnp.float32)[None, :]
                return jax.lax.dynamic_update_index_in_dim(out, y.astype(out_dtype), b, 0)
            dx = jnp.stack([_dot(dy[b], lo, ((1,), (0,)), dtype), _dot(dy[b], hi, ((1,), (0,)), dtype)])
            return jax.lax.dynamic_update_index_in_dim(out, dx, b, 1)

        return jax.lax.fori_loop(starts[i], ends[i], block, out)

    out = jax.lax.fori_loop(0, count, expert, out)
    return out.reshape(nb * bsz, n) if kind == "fwd" else _unplanes(out.reshape(2, nb * bsz, g * 16))


# ---------------------------------------------------------------- entry points

def _check(x, blocks, scales, block_expert, bsz, backend, transposed):
    """(N, K) of the weights, after checking x [nb*bsz, K] (forward; on TPU also slabs [S, nb*bsz, K/S]) or
    dy [nb*bsz, N] against them (TPU layout: K may be padded to the words' Kp)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MXFP4 kernel backend {backend!r}; choose one of {BACKENDS}")
    if mxfp4.is_tpu(blocks) and backend != TPU:
        raise ValueError(f"MXFP4 weights in the TPU layout (u32 words {blocks.shape}) run on the TPU kernel only, "
                         f"not {backend!r}: keep the checkpoint layout off TPU (gptoss_jax.mxfp4.from_tpu)")
    n, k = mxfp4.dims(blocks.shape, scales.shape)
    e = scales.shape[0]
    ndim = 3 if backend == TPU and not transposed else 2
    got = n if transposed else x.shape[-1] * (x.shape[0] if x.ndim == 3 else 1)
    fits = got == n if transposed else (mxfp4.fits_tpu(got, k) if mxfp4.is_tpu(blocks) else got == k)
    if x.ndim not in (2, ndim) or x.shape[-2] != block_expert.shape[0] * bsz or not fits \
            or (x.ndim == 3 and x.shape[0] > 1 and x.shape[2] % mxfp4.GROUP):
        raise ValueError(f"MXFP4 grouped matmul: rows {x.shape} must be [{block_expert.shape[0]} blocks x {bsz}, "
                         f"{n if transposed else k}]" + (" (or slabs of a multiple of 64 columns)" if ndim == 3 else "")
                         + f" for weights [{e}, {n}, {k}]")
    return n, (got if not transposed else k)


def gmm(x, blocks, scales, block_expert, *, bsz: int, backend: str, interpret: bool = False,
        rows: int | None = None, bias=None, out_dtype=jnp.float32):
    """x [nb*bsz, K] (block b's rows times expert block_expert[b]) -> [nb*bsz, N] in ``out_dtype``:
    x @ W_e^T, plus ``bias`` [E, N] row e (None: none) in float32 before the one rounding to
    ``out_dtype``; padding blocks give zeros. ``rows``: real (non-padding) rows, if known: bounds the
    distinct experts in the TPU cost estimate."""
    e, (n, _) = scales.shape[0], _check(x, blocks, scales, block_expert, bsz, backend, False)
    if bias is not None and bias.shape != (e, n):
        raise ValueError(f"MXFP4 grouped matmul: bias {bias.shape} must be [{e}, {n}]")
    return _CALLS[backend]("fwd", x, blocks, scales, block_expert, bsz, x.dtype, interpret, rows, bias, out_dtype)


def gmm_t(dy, blocks, scales, block_expert, *, bsz: int, backend: str, interpret: bool = False, k: int | None = None):
    """dy [nb*bsz, N] -> float32 [nb*bsz, K]; dy @ W_e per block (the transposed product, for dx). ``k``: the
    contraction size of weights in the TPU layout whose K is not a multiple of 64 (default: the words' Kp)."""
    _check(dy, blocks, scales, block_expert, bsz, backend, True)
    if backend == TPU:
        return _tpu_call("bwd", dy, blocks, scales, block_expert, bsz, dy.dtype, interpret, k=k)
    return _CALLS[backend]("bwd", dy, blocks, scales, block_expert, bsz, dy.dtype, interpret)


_CALLS = {TPU: _tpu_call, GPU: _gpu_call, CPU: _cpu_call}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 9))
def grouped_matmul(x, blocks, scales, block_expert, bsz, backend, interpret, rows=None, bias=None,
                   out_dtype=jnp.float32):
    """:func:`gmm` differentiable in x and ``bias`` (the packed weights are frozen: no cotangent)."""
    return gmm(x, blocks, scales, block_expert, bsz=bsz, backend=backend, interpret=interpret, rows=rows,
               bias=bias, out_dtype=out_dtype)


def _fwd(x, blocks, scales, block_expert, bsz, backend, interpret, rows, bias, out_dtype):
    y = grouped_matmul(x, blocks, scales, block_expert, bsz, backend, interpret, rows, bias, out_dtype)
    # x's dtype and form ([0, K], or [S, 0, K/S] for slabs) ride as empty arrays
    like = jnp.zeros((*x.shape[:-2], 0, x.shape[-1]), x.dtype), None if bias is None else jnp.zeros((0,), bias.dtype)
    return y, (blocks, scales, block_expert, like)


def _bwd(bsz, backend, interpret, rows, out_dtype, res, dy):
    blocks, scales, block_expert, (like, bias_like) = res
    dtype, s = like.dtype, (like.shape[0] if like.ndim == 3 else 1)
    dx = gmm_t(dy.astype(dtype), blocks, scales, block_expert, bsz=bsz, backend=backend, interpret=interpret,
               k=s * like.shape[-1])
    dx = dx if like.ndim == 2 else slabs(dx, s)
    dbias = None
    if bias_like is not None:  # row e of the bias: the sum of dy over the rows of expert e's blocks
        e = scales.shape[0]
        per_block = dy.astype(jnp.float32).reshape(block_expert.shape[0], bsz, -1).sum(axis=1)
        dbias = jax.ops.segment_sum(per_block, block_expert, num_segments=e + 1)[:e]  # padding blocks (id E) dropped
        dbias = dbias.astype(bias_like.dtype)
    return dx.astype(dtype), None, None, None, dbias


grouped_matmul.defvjp(_fwd, _bwd)


def gmm_bias(x, blocks, scales, bias, block_expert, *, bsz: int, backend: str = TPU, interpret: bool = False,
             rows: int | None = None):
    """``(x @ W_e^T + bias_e)`` in x's dtype (:func:`grouped_matmul` with the bias [E, N] added to the
    float32 products inside the kernel and rounded once), so no float32 [rows, N] product reaches HBM.
    Differentiable in x and the bias (the packed weights are frozen)."""
    return grouped_matmul(x, blocks, scales, block_expert, bsz, backend, interpret, rows, bias, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def gmm_swiglu(x, blocks, scales, bias, block_expert, bsz, alpha, limit, interpret=False, rows=None, as_slabs=False):
    """The gate_up projection with the clamped SwiGLU in the TPU kernel's epilogue: x [nb*bsz, K], gate_up
    weights [E, 2I, K] (either layout; output columns interleaved: even = gate, odd = up), bias [E, 2I]
    -> [nb*bsz, I] in x's dtype, equal to ``moe.swiglu(gmm_bias(x, ...), alpha, limit)`` (the same float32
    sums, roundings and SwiGLU math) without the [rows, 2I] output or its gate / up halves in HBM.
    ``as_slabs``: the kernel's own output form, [2I/tn, nb*bsz, tn/2] (:func:`slabs` of the above, one slab
    per N tile), which the down projection's kernel reads without a relayout.
    Padding blocks give zeros. Differentiable in x and the bias (the backward recomputes gate_up unfused)."""
    _check(x, blocks, scales, block_expert, bsz, TPU, False)
    e, n = scales.shape[0], mxfp4.dims(blocks.shape, scales.shape)[0]
    if bias.shape != (e, n) or n % 2:
        raise ValueError(f"MXFP4 gate_up + SwiGLU: bias {bias.shape} must be [{e}, {n}] with an even {n}")
    out = _tpu_call("fwd", x, blocks, scales, block_expert, bsz, x.dtype, interpret, rows, bias, x.dtype,
                    (alpha, limit))
    return out if as_slabs else unslab(out)


def _swiglu_unfused(x, blocks, scales, bias, block_expert, bsz, alpha, limit, interpret, rows):
    gate_up = gmm_bias(x, blocks, scales, bias, block_expert, bsz=bsz, interpret=interpret, rows=rows)
    return clamped_swiglu(gate_up[:, 0::2].astype(jnp.float32), gate_up[:, 1::2].astype(jnp.float32),
                          alpha, limit).astype(x.dtype)


def _swiglu_fwd(x, blocks, scales, bias, block_expert, bsz, alpha, limit, interpret, rows, as_slabs):
    y = gmm_swiglu(x, blocks, scales, bias, block_expert, bsz, alpha, limit, interpret, rows, as_slabs)
    return y, (x, blocks, scales, bias, block_expert)


def _swiglu_bwd(bsz, alpha, limit, interpret, rows, as_slabs, res, dy):
    x, blocks, scales, bias, block_expert = res
    _, vjp = jax.vjp(lambda x, bias: _swiglu_unfused(x, blocks, scales, bias, block_expert, bsz, alpha, limit,
                                                     interpret, rows), x, bias)
    dx, dbias = vjp(unslab(dy) if as_slabs else dy)
    return dx, None, None, dbias, None


gmm_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
