"""Flash attention with sinks in Pallas (Mosaic TPU and Triton GPU): the ``'pallas'`` attention path.

Same contract as :func:`gptoss_jax.layers.attention.attention_kv_major`: q [B,T,nq,D], k/v [B,nkv,S,D]
(cache layout), one learned sink logit per query head in the softmax denominator only, visibility
from positions (key j visible to query i iff ``k_pos[j] >= 0``, ``q_pos[i] >= 0``, ``k_pos[j] <=
q_pos[i]`` and, for a window ``w > 0``, ``k_pos[j] > q_pos[i] - w``, the window counting the query's
own position), optional segment ids (packed training).

Why not jax's bundled splash attention (which takes sinks): its masks are static (numpy) functions of
the query and key *indices*, while the engine's prefill attends a chunk whose positions start at a
per-row, traced offset to a cache of slots (full layers: slot = position, ring layers: the ring's
old slots then the chunk), with padding rows and empty slots (position -1). Only a mask computed from
the positions inside the kernel expresses all of it, so this kernel reads q/k positions (and segment
ids) block by block and builds the mask itself; nothing falls back, every call of the contract is
exact.

The sink is folded into the normalizer (as in :mod:`gptoss_jax.layers.flash`): each query row starts
its running max at its head's sink logit with a running denominator of 1 and an empty accumulator, so
a row that sees no key ends as 0 and no -inf - -inf appears. Scores are float32 (bf16 inputs:
bf16 products accumulated in float32), probabilities are cast to v's dtype for the value product,
which accumulates in float32: the exact path's arithmetic up to summation order.

Key blocks visited by query block ``i`` are the range ``lo[i] <= j < hi[i]`` of
:func:`gptoss_jax.layers.flash.block_ranges` (computed from the positions, all rows together): the
causal triangle for full layers, a band of ~window + block keys for sliding layers, only the filled
slots of a cache. Skipped blocks are neither read nor computed.

- TPU (Mosaic): grid (B, nkv, query blocks, key steps); one program holds the ``g = nq / nkv`` query
  heads of a KV head (GQA: each K/V block is read once for the group), scratch m / l / acc in VMEM
  across the key steps (the innermost, "arbitrary" axis). Key step ``j`` works on key block
  ``lo[i] + j`` while that is ``< hi[i]``; later steps repeat the last block index (no DMA) and
  compute nothing. Sliding layers take only :func:`band_steps` key steps (4 of 65 at window 128, 32k
  tokens, blocks of 512) when the ranges fit, which they do for keys in position order.
- GPU (Triton): grid (B, nq, query blocks); each program loops over its visited key blocks.

Both read q and write the output in the model's [B, T, nq, D] layout (as [B, T, nq*D], a head's
columns sliced in the kernel): no transposed copies.

The gradient (training with ``impl='pallas'``) is the blocked path's flash backward
(:func:`gptoss_jax.layers.flash.block_attention_kv_major` differentiated), recomputing its forward.

Backend: $GPTOSS_ATTENTION_KERNEL (``tpu``, ``gpu``, ``interpret`` = the TPU kernel in Pallas
interpret mode, ``interpret-gpu``), else the platform being traced for
(:func:`gptoss_jax.platform.current`: Mosaic on 'tpu', Triton on 'gpu', interpret mode on 'cpu'),
else chosen by XLA when lowering (:func:`gptoss_jax.platform.dependent`).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gptoss_jax import platform as gptoss_platform
from gptoss_jax.layers.flash import block_attention_kv_major, block_ranges

TPU = "tpu"
GPU = "gpu"
KERNEL_ENV = "GPTOSS_ATTENTION_KERNEL"
KERNEL_MODES = (TPU, GPU, "interpret", "interpret-gpu")
#: Default (query, key) block lengths per backend.
BLOCKS = {TPU: (512, 512), GPU: (64, 64)}


def _dot(a, b, contract, dtype):
    prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())), precision=prec,
                               preferred_element_type=jnp.float32)


def _visible(qp, kp, window, qs=None, ks=None):
    """[bq, bk] bool from query positions [bq, 1] and key positions [1, bk] (and segment ids)."""
    mask = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if window > 0:
        mask = mask & (kp > qp - window)
    if qs is not None:
        mask = mask & (qs == ks)
    return mask


def _step(q, k, v, mask, m, l, acc, scale, dtype):
    """One key block of the online softmax: q [bq, D], k/v [bk, D], mask [bq, bk], m/l [bq, 1], acc [bq, D]."""
    s = _dot(q, k, ((1,), (1,)), dtype) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = l * alpha + p.sum(axis=1, keepdims=True)
    acc = acc * alpha + _dot(p.astype(v.dtype), v, ((1,), (0,)), dtype)
    return m_new, l, acc


# ---------------------------------------------------------------- TPU (Mosaic)

def _tpu_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, *rest, g, window, scale, has_seg, dtype):
    if has_seg:
        qs_ref, ks_ref, sink_ref, o_ref, m_sc, l_sc, acc_sc = rest
    else:
        sink_ref, o_ref, m_sc, l_sc, acc_sc = rest
    i, j = pl.program_id(2), pl.program_id(3)
    bq, d = q_ref.shape[1], k_ref.shape[3]

    @pl.when(j == 0)
    def _():
        for h in range(g):
            m_sc[h] = jnp.broadcast_to(sink_ref[0, pl.ds(h, 1), :][:, :1], (bq, 1))
            l_sc[h] = jnp.ones((bq, 1), jnp.float32)
            acc_sc[h] = jnp.zeros(acc_sc.shape[1:], jnp.float32)

    @pl.when(lo_ref[i] + j < hi_ref[i])
    def _():
        segs = (qs_ref[0], ks_ref[0]) if has_seg else ()
        mask = _visible(qp_ref[0], kp_ref[0], window, *segs)
        k, v = k_ref[0, 0], v_ref[0, 0]
        for h in range(g):
            q = q_ref[0, :, pl.ds(h * d, d)]
            m, l, acc = _step(q, k, v, mask, m_sc[h], l_sc[h], acc_sc[h], scale, dtype)
            m_sc[h], l_sc[h], acc_sc[h] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        for h in range(g):
            o_ref[0, :, pl.ds(h * d, d)] = (acc_sc[h] / l_sc[h]).astype(o_ref.dtype)


def _tpu_call(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, lo, hi, window, bq, bk, interpret, steps=None):
    """q [B, Tp, nq*D] (heads of KV head h in columns h*g*D ...), k/v [B, nkv, Sp, D], positions [B, Tp] /
    [B, Sp] -> [B, Tp, nq*D].

    q and the output keep the model's [B, T, nq, D] layout (no transposed copies; a [.., D=64] minor
    dim would also be padded to 128 lanes in HBM): block (1, bq, g*D) is the query block of one KV
    head's group. ``steps``: key steps per query block (default all key blocks; at least max(hi - lo))."""
    from jax.experimental.pallas import tpu as pltpu

    b, tp, _ = q.shape
    nkv, sp, d = k.shape[1], k.shape[2], k.shape[3]
    g = q.shape[2] // (nkv * d)
    nqb, nkb = tp // bq, steps or sp // bk
    has_seg = q_seg is not None

    def kblock(i, j, lo, hi):  # the key block of step j: lo[i] + j, clamped to the last visited one
        return jnp.maximum(jnp.minimum(lo[i] + j, hi[i] - 1), 0)

    q_spec = pl.BlockSpec((1, bq, g * d), lambda bi, h, i, j, lo, hi: (bi, i, h))
    kv_spec = pl.BlockSpec((1, 1, bk, d), lambda bi, h, i, j, lo, hi: (bi, h, kblock(i, j, lo, hi), 0))
    qcol_spec = pl.BlockSpec((1, bq, 1), lambda bi, h, i, j, lo, hi: (bi, i, 0))
    krow_spec = pl.BlockSpec((1, 1, bk), lambda bi, h, i, j, lo, hi: (bi, 0, kblock(i, j, lo, hi)))
    sink_spec = pl.BlockSpec((1, g, 128), lambda bi, h, i, j, lo, hi: (h, 0, 0))
    args = [q, k, v, q_pos[:, :, None], k_pos[:, None, :]]
    specs = [q_spec, kv_spec, kv_spec, qcol_spec, krow_spec]
    if has_seg:
        args += [q_seg[:, :, None], k_seg[:, None, :]]
        specs += [qcol_spec, krow_spec]
    args.append(jnp.broadcast_to(sinks.astype(jnp.float32).reshape(nkv, g, 1), (nkv, g, 128)))
    specs.append(sink_spec)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, nkv, nqb, nkb), in_specs=specs, out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((g, bq, 1), jnp.float32), pltpu.VMEM((g, bq, 1), jnp.float32),
                        pltpu.VMEM((g, bq, d), jnp.float32)])
    kernel = functools.partial(_tpu_kernel, g=g, window=window, scale=1.0 / math.sqrt(d), has_seg=has_seg,
                               dtype=q.dtype)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
                                  vmem_limit_bytes=64 * 2**20)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid_spec=grid_spec,
                          compiler_params=params, interpret=interpret, name="flash_attention_sinks",
                          )(lo, hi, *args)


# ---------------------------------------------------------------- GPU (Triton)

def _gpu_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, *rest, g, bq, bk, window, scale, has_seg,
                dtype):
    if has_seg:
        qs_ref, ks_ref, sink_ref, o_ref = rest
    else:
        sink_ref, o_ref = rest
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // g
    d = k_ref.shape[3]
    rows, cols_h = pl.ds(i * bq, bq), pl.ds(h * d, d)
    q = q_ref[b, rows, cols_h]
    qp = qp_ref[b, rows][:, None]
    qs = qs_ref[b, rows][:, None] if has_seg else None

    def body(jb, carry):
        cols = pl.ds(jb * bk, bk)
        ks = ks_ref[b, cols][None, :] if has_seg else None
        mask = _visible(qp, kp_ref[b, cols][None, :], window, qs, ks)
        return _step(q, k_ref[b, kh, cols, :], v_ref[b, kh, cols, :], mask, *carry, scale, dtype)

    m0 = jnp.full((bq, 1), sink_ref[h], jnp.float32)
    init = (m0, jnp.ones((bq, 1), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
    o_ref[b, rows, cols_h] = (acc / l).astype(o_ref.dtype)


def _gpu_call(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, lo, hi, window, bq, bk, interpret):
    """q [B, Tp, nq*D] (the model's layout: head h in columns h*D ...), k/v [B, nkv, Sp, D] -> [B, Tp, nq*D]."""
    from jax.experimental.pallas import triton as pltr

    b, tp, _ = q.shape
    nkv, d = k.shape[1], k.shape[3]
    nq = q.shape[2] // d
    has_seg = q_seg is not None
    segs = [q_seg, k_seg] if has_seg else []
    kernel = functools.partial(_gpu_kernel, g=nq // nkv, bq=bq, bk=bk, window=window, scale=1.0 / math.sqrt(d),
                               has_seg=has_seg, dtype=q.dtype)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(b, nq, tp // bq),
                          compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
                          name="flash_attention_sinks",
                          )(lo, hi, q, k, v, q_pos, k_pos, *segs, sinks.astype(jnp.float32))


# ---------------------------------------------------------------- entry points

def kernel_choice(mode: str | None = None, platform: str | None = None) -> tuple[str, bool] | None:
    """(backend, interpret) for the platform, or None when it is not known while tracing.

    ``mode``: one of KERNEL_MODES (default: $GPTOSS_ATTENTION_KERNEL); else ``platform`` (default
    :func:`gptoss_jax.platform.current`): 'tpu' -> Mosaic, 'gpu' -> Triton, 'cpu' -> the TPU kernel
    in interpret mode."""
    mode = mode or os.environ.get(KERNEL_ENV) or None
    if mode is not None:
        if mode not in KERNEL_MODES:
            raise ValueError(f"{KERNEL_ENV}={mode!r}: choose one of {KERNEL_MODES}")
        if mode.startswith("interpret"):
            return (GPU if mode == "interpret-gpu" else TPU), True
        return mode, False
    platform = platform or gptoss_platform.current()
    if platform is None:
        return None
    platform = gptoss_platform.normalize(platform)
    return {"tpu": (TPU, False), "gpu": (GPU, False)}.get(platform, (TPU, True))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def unsupported(backend: str, nq: int, nkv: int, d: int, interpret: bool = False) -> str | None:
    """Why the compiled kernel cannot take these heads (None: it can). Mosaic: a KV head's query group
    (g*D columns) must fill whole 128-lane tiles (or be all the heads); Triton: D a power of two >= 16.
    Interpret mode takes any shape."""
    if interpret:
        return None
    g = nq // nkv
    if backend == TPU and (g * d) % 128 and nkv > 1:
        return f"the TPU kernel needs (heads per KV head) x head_dim a multiple of 128, got {g} x {d}"
    if backend == GPU and (d < 16 or d & (d - 1)):
        return f"the GPU kernel needs head_dim a power of two >= 16, got {d}"
    return None


def flash_forward(q, k, v, sinks, q_pos, k_pos, window: int, q_seg=None, k_seg=None, *, backend: str,
                  interpret: bool = False, block_q: int | None = None, block_k: int | None = None):
    """The kernel's forward (no gradient). Shapes as :func:`attention`; T and S need not divide the blocks
    (queries are padded with position -1, keys with -1 positions and zeros)."""
    b, t, nq, d = q.shape
    nkv, s = k.shape[1], k.shape[2]
    if backend not in BLOCKS:
        raise ValueError(f"unknown attention kernel backend {backend!r}; choose one of {tuple(BLOCKS)}")
    if nq % nkv or k.shape != (b, nkv, s, d) or v.shape != k.shape:
        raise ValueError(f"pallas attention: q {q.shape} does not fit k {k.shape} / v {v.shape}")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("pallas attention: give both q_seg and k_seg, or neither")
    why = unsupported(backend, nq, nkv, d, interpret)
    if why:
        raise ValueError(f"pallas attention: {why}")
    dq, dk = BLOCKS[backend]
    if backend == TPU:
        bq = min(block_q or dq, _round_up(t, 8 if interpret else 16))  # bf16 sublane tiles hold 16 rows
        bk = min(block_k or dk, _round_up(s, 8 if interpret else 128))
    else:  # Triton blocks are powers of two (at least 16 for the dots)
        bq, bk = min(block_q or dq, _pow2(max(t, 16))), min(block_k or dk, _pow2(max(s, 16)))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    pad_t, pad_s = ((0, 0), (0, tp - t)), ((0, 0), (0, sp - s))
    q_pos = jnp.pad(q_pos.astype(jnp.int32), pad_t, constant_values=-1)
    k_pos = jnp.pad(k_pos.astype(jnp.int32), pad_s, constant_values=-1)
    if q_seg is not None:
        q_seg, k_seg = jnp.pad(q_seg.astype(jnp.int32), pad_t), jnp.pad(k_seg.astype(jnp.int32), pad_s)
    kpad = ((0, 0), (0, 0), (0, sp - s), (0, 0))
    k, v = jnp.pad(k, kpad), jnp.pad(v, kpad)
    lo, hi = block_ranges(q_pos, k_pos, jnp.zeros((), jnp.int32) if q_seg is None else q_seg,
                          jnp.zeros((), jnp.int32) if k_seg is None else k_seg, window, bq, bk)
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp, nq * d)  # no transposed copy
    args = (q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, lo, hi, window, bq, bk, interpret)
    band = band_steps(window, bq, bk)
    if backend == GPU:  # each program loops over exactly its visited blocks
        out = _gpu_call(*args)
    elif band < sp // bk:  # a sliding layer: a grid of `band` key steps, unless some query block visits more
        out = jax.lax.cond(jnp.max(hi - lo) <= band, lambda: _tpu_call(*args, steps=band), lambda: _tpu_call(*args))
    else:
        out = _tpu_call(*args)
    return out.reshape(b, tp, nq, d)[:, :t]


def band_steps(window: int, bq: int, bk: int) -> int:
    """Key blocks a query block of a sliding layer visits when keys are in position order (the chunk
    after the ring, or a sequence): its visible positions span window - 1 + bq, i.e. at most
    ceil((window - 1 + bq) / bk) + 1 blocks, + 1 for a ring ahead of the chunk. Unbounded (a large
    number) for full layers. The TPU grid takes this many key steps instead of all key blocks when
    every query block's range fits (checked at run time, else the full grid)."""
    return -(-(window - 1 + bq) // bk) + 2 if window > 0 else 1 << 30


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 9, 10, 11, 12))
def _flash(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, backend, interpret, block_q, block_k):
    return flash_forward(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, backend=backend, interpret=interpret,
                         block_q=block_q, block_k=block_k)


def _flash_fwd(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, backend, interpret, block_q, block_k):
    out = _flash(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, backend, interpret, block_q, block_k)
    return out, (q, k, v, sinks, q_pos, k_pos, q_seg, k_seg)


def _flash_bwd(window, backend, interpret, block_q, block_k, res, dout):
    q, k, v, sinks, q_pos, k_pos, q_seg, k_seg = res
    _, vjp = jax.vjp(lambda *a: block_attention_kv_major(*a, q_pos, k_pos, window, q_seg, k_seg), q, k, v, sinks)
    return (*vjp(dout), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, sinks, q_pos, k_pos, window: int, q_seg=None, k_seg=None, *,
                    backend: str | None = None, interpret: bool | None = None, block_q: int | None = None,
                    block_k: int | None = None):
    """Attention with sinks by the Pallas kernel: q [B,T,nq,D], k/v [B,nkv,S,D], sinks [nq], q_pos [B,T],
    k_pos [B,S], optional segment ids -> [B,T,nq,D] in q's dtype; differentiable (blocked backward).

    ``backend`` (``'tpu'`` / ``'gpu'``) and ``interpret`` default to :func:`kernel_choice`; when the
    platform is not known while tracing, XLA picks the kernel when lowering (interpret mode on CPU); a
    compiled kernel that cannot take the heads (:func:`unsupported`) is then the blocked path instead,
    since every platform's branch is traced."""
    if backend is None:
        choice = kernel_choice()
        if choice is None:
            def run(be, it):
                if unsupported(be, q.shape[2], k.shape[1], q.shape[3], it):
                    return lambda q, k, v, sinks, q_pos, k_pos, q_seg, k_seg: block_attention_kv_major(
                        q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, block_q=block_q, block_k=block_k)
                return lambda q, k, v, sinks, q_pos, k_pos, q_seg, k_seg: _flash(
                    q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, be, it, block_q, block_k)
            return gptoss_platform.dependent(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, tpu=run(TPU, False),
                                             gpu=run(GPU, False), default=run(TPU, True))
        backend, default_interpret = choice
        interpret = default_interpret if interpret is None else interpret
    return _flash(q, k, v, sinks, q_pos, k_pos, window, q_seg, k_seg, backend, bool(interpret), block_q, block_k)
