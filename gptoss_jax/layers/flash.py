"""Blocked (flash-style) attention with sinks in plain JAX: online softmax over key blocks.

Same contract as :func:`gptoss_jax.layers.attention.attention_kv_major` (visibility from positions,
window and segment ids; one learned sink logit per head in the denominator), computed one query
block at a time against one key block at a time, so memory is O(T x block), never T x S scores.

The sink is folded into the normalizer: each query row starts its running max at its head's sink
logit with a running denominator of 1 (``exp(sink - sink)``) and an empty accumulator; a row that
sees no key (padding, an empty cache) ends as 0, like the exact path.

Which key blocks a query block visits is computed from the positions, not assumed: block ``j`` is
visited by query block ``i`` unless no key of ``j`` can be visible to any query of ``i`` in any batch
row (its valid key positions all after the block's last query position, all at or before its first
query position minus the window, or its segment-id range disjoint). Every pair that is skipped
is invisible, so the result is exact for any positions; the visited blocks of query block ``i`` are
the range from the first to the last block that passes the test. With positions in sequence order
this is the causal triangle for full layers, a band of ``window + block`` keys for sliding layers
(O(T x window) work), and, in a context-sized cache read at a given length, only the blocks
holding filled slots (decode reads ``length``, not ``context``, keys).

The loops have data-dependent bounds, which reverse-mode autodiff cannot go through, so the
gradient is a ``custom_vjp``: the flash backward, recomputing each visited block's probabilities
from the saved log-sum-exp (sink included), again O(T x block) memory.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from gptoss_jax.layers.common import precision_for

#: Default query and key block lengths (a [heads, 512, 512] float32 score block is 64 MiB at 64 heads).
BLOCK_Q = 512
BLOCK_K = 512

_BIG = jnp.iinfo(jnp.int32).max


def block_attention_kv_major(q: jax.Array, k: jax.Array, v: jax.Array, sinks: jax.Array, q_pos: jax.Array,
                             k_pos: jax.Array, window: int, q_seg: jax.Array | None = None,
                             k_seg: jax.Array | None = None, *, block_q: int | None = None,
                             block_k: int | None = None) -> jax.Array:
    """Blocked attention. q [B,Tq,nq,D], k/v [B,nkv,S,D] (cache layout), sinks [nq], q_pos [B,Tq],
    k_pos [B,S], optional segment ids q_seg [B,Tq] / k_seg [B,S] -> [B,Tq,nq,D] in q's dtype.

    ``block_q`` / ``block_k`` default to the module's BLOCK_Q / BLOCK_K (read at call time).
    """
    b, t, nq, d = q.shape
    nkv, s = k.shape[1], k.shape[2]
    if nq % nkv or k.shape != (b, nkv, s, d) or v.shape != k.shape:
        raise ValueError(f"block attention: q {q.shape} does not fit k {k.shape} / v {v.shape} "
                         "(want k, v [B, nkv, S, D] with nkv dividing nq)")
    if (q_seg is None) != (k_seg is None):
        raise ValueError("block attention: give both q_seg and k_seg, or neither")
    bq, bk = min(block_q or BLOCK_Q, t), min(block_k or BLOCK_K, s)
    nqb = -(-t // bq)
    pad = nqb * bq - t
    if pad:  # padded queries (position -1) see nothing and are cut off the output
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
        q_seg = None if q_seg is None else jnp.pad(q_seg, ((0, 0), (0, pad)))
    if q_seg is None:
        q_seg = k_seg = jnp.zeros((), jnp.int32)  # one segment: no constraint
    out = _flash(window, bq, bk, q, k, v, sinks, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                 q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    return out[:, :t]


def block_ranges(q_pos, k_pos, q_seg, k_seg, window: int, bq: int, bk: int) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) int32 [n_q_blocks]: the key blocks ``lo <= j < hi`` query block ``i`` visits (0, 0: none).

    q_pos [B, n*bq], k_pos [B, S]; segment ids of the same shapes or scalars (no segments).
    """
    nqb, nkb = q_pos.shape[1] // bq, -(-k_pos.shape[1] // bk)

    def stats(pos, seg, block, n):  # min / max over each block's valid entries, all rows together
        pos = jnp.pad(pos, ((0, 0), (0, n * block - pos.shape[1])), constant_values=-1)
        seg = jnp.broadcast_to(jnp.pad(seg, ((0, 0), (0, n * block - seg.shape[1])))
                               if seg.ndim else seg, pos.shape)
        ok = (pos >= 0).reshape(pos.shape[0], n, block)

        def lo_hi(x):
            x = x.reshape(ok.shape)
            return jnp.where(ok, x, _BIG).min(axis=(0, 2)), jnp.where(ok, x, -_BIG).max(axis=(0, 2))
        return lo_hi(pos), lo_hi(seg)

    (qmin, qmax), (qsmin, qsmax) = stats(q_pos, q_seg, bq, nqb)
    (kmin, kmax), (ksmin, ksmax) = stats(k_pos, k_seg, bk, nkb)
    vis = (kmin[None, :] <= qmax[:, None]) & (ksmin[None, :] <= qsmax[:, None]) & (ksmax[None, :] >= qsmin[:, None])
    if window > 0:
        vis &= kmax[None, :] > qmin[:, None] - window
    j = jnp.arange(nkb, dtype=jnp.int32)
    lo = jnp.where(vis, j, nkb).min(axis=1)
    hi = jnp.where(vis, j + 1, 0).max(axis=1)
    return jnp.minimum(lo, hi).astype(jnp.int32), hi.astype(jnp.int32)


def _blocks(window, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg, i, j):
    """Query block ``i`` and key block ``j``: (qb [B,bq,nkv,g,D], kb, vb [B,nkv,bk,D], mask [B,1,1,bq,bk]).

    The last key block starts early when ``bk`` does not divide S; its keys before ``j * bk`` (already
    counted by block ``j - 1``) are masked out.
    """
    b, tp, nq, d = q.shape
    nkv, s = k.shape[1], k.shape[2]
    qb = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1).reshape(b, bq, nkv, nq // nkv, d)
    qp = lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1)
    start = jnp.minimum(j * bk, s - bk)
    kb = lax.dynamic_slice_in_dim(k, start, bk, axis=2)
    vb = lax.dynamic_slice_in_dim(v, start, bk, axis=2)
    kp = lax.dynamic_slice_in_dim(k_pos, start, bk, axis=1)
    qp_, kp_ = qp[:, :, None], kp[:, None, :]
    mask = (kp_ >= 0) & (qp_ >= 0) & (kp_ <= qp_) & (start + jnp.arange(bk) >= j * bk)[None, None, :]
    if window > 0:
        mask &= kp_ > qp_ - window
    if q_seg.ndim:
        qs = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
        ks = lax.dynamic_slice_in_dim(k_seg, start, bk, axis=1)
        mask &= qs[:, :, None] == ks[:, None, :]
    return qb, kb, vb, mask[:, None, None], start


def _scores(qb, kb, mask, d):
    """[B,nkv,g,bq,bk] float32 scaled scores, -inf where masked."""
    s = jnp.einsum("btkgd,bksd->bkgts", qb, kb, precision=precision_for(qb.dtype),
                   preferred_element_type=jnp.float32) * jnp.float32(1.0 / math.sqrt(d))
    return jnp.where(mask, s, -jnp.inf)


def _forward(window, bq, bk, q, k, v, sinks, q_pos, k_pos, q_seg, k_seg):
    """-> (out [B, Tp, nq, D] in q's dtype, lse [n_q_blocks, B, nkv, g, bq] float32, sink included)."""
    b, tp, nq, d = q.shape
    nkv = k.shape[1]
    g = nq // nkv
    prec = precision_for(q.dtype)
    lo, hi = block_ranges(q_pos, k_pos, q_seg, k_seg, window, bq, bk)
    sink = sinks.astype(jnp.float32).reshape(1, nkv, g, 1)

    def q_block(_, i):
        def step(j, carry):
            m, l, acc = carry
            qb, kb, vb, mask, _ = _blocks(window, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg, i, j)
            s = _scores(qb, kb, mask, d)
            m_new = jnp.maximum(m, s.max(axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            acc = acc * alpha[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vb, precision=prec,
                                                      preferred_element_type=jnp.float32)
            return m_new, l * alpha + p.sum(axis=-1), acc

        m0 = jnp.broadcast_to(sink, (b, nkv, g, bq))
        init = (m0, jnp.ones_like(m0), jnp.zeros((b, nkv, g, bq, d), jnp.float32))
        m, l, acc = lax.fori_loop(lo[i], hi[i], step, init)
        out = (acc / l[..., None]).astype(q.dtype)  # [B, nkv, g, bq, D]
        return None, (out, m + jnp.log(l))

    _, (out, lse) = lax.scan(q_block, None, jnp.arange(tp // bq))
    out = jnp.moveaxis(out, 4, 1).reshape(tp // bq, bq, b, nkv, g, d)  # [n, bq, B, nkv, g, D]
    return jnp.moveaxis(out, 2, 0).reshape(b, tp, nq, d), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(window, bq, bk, q, k, v, sinks, q_pos, k_pos, q_seg, k_seg):
    return _forward(window, bq, bk, q, k, v, sinks, q_pos, k_pos, q_seg, k_seg)[0]


def _flash_fwd(window, bq, bk, q, k, v, sinks, q_pos, k_pos, q_seg, k_seg):
    out, lse = _forward(window, bq, bk, q, k, v, sinks, q_pos, k_pos, q_seg, k_seg)
    return out, (q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(window, bq, bk, res, dout):
    """Flash backward: per query block, over its visited key blocks, p = exp(s - lse);
    dv += p^T dO, ds = p (dO v^T - rowsum(dO o)), dq += ds k, dk += ds^T q; dsink = -sum p_sink rowsum(dO o)."""
    q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, out, lse = res
    b, tp, nq, d = q.shape
    nkv = k.shape[1]
    g = nq // nkv
    prec = precision_for(q.dtype)
    scale = jnp.float32(1.0 / math.sqrt(d))
    lo, hi = block_ranges(q_pos, k_pos, q_seg, k_seg, window, bq, bk)
    # rowsum(dO * O) per query row [B, Tp, nkv, g] -> per block like lse
    delta = jnp.einsum("btnd,btnd->btn", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.moveaxis(delta.reshape(b, tp // bq, bq, nkv, g), (1, 2), (0, 4))  # [n, B, nkv, g, bq]
    do = dout.astype(q.dtype)

    def q_block(carry, i):
        dk, dv = carry
        do_b = lax.dynamic_slice_in_dim(do, i * bq, bq, axis=1).reshape(b, bq, nkv, g, d)
        lse_i, delta_i = lse[i], delta[i]

        def step(j, c):
            dq, dk, dv = c
            qb, kb, vb, mask, start = _blocks(window, bq, bk, q, k, v, q_pos, k_pos, q_seg, k_seg, i, j)
            p = jnp.exp(_scores(qb, kb, mask, d) - lse_i[..., None])  # [B,nkv,g,bq,bk]
            dv_j = jnp.einsum("bkgts,btkgd->bksd", p.astype(q.dtype), do_b, precision=prec,
                              preferred_element_type=jnp.float32)
            dp = jnp.einsum("btkgd,bksd->bkgts", do_b, vb, precision=prec, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
            dq = dq + jnp.einsum("bkgts,bksd->btkgd", ds, kb, precision=prec, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgts,btkgd->bksd", ds, qb, precision=prec, preferred_element_type=jnp.float32)
            add = lambda acc, x: lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, lax.dynamic_slice_in_dim(acc, start, bk, axis=2) + x, start, axis=2)
            return dq, add(dk, dk_j), add(dv, dv_j)

        dq0 = jnp.zeros((b, bq, nkv, g, d), jnp.float32)
        dq, dk, dv = lax.fori_loop(lo[i], hi[i], step, (dq0, dk, dv))
        p_sink = jnp.exp(sinks.astype(jnp.float32).reshape(1, nkv, g, 1) - lse_i)
        return (dk, dv), (dq, -(p_sink * delta_i).sum(axis=(0, 3)))

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), (dq, dsink) = lax.scan(q_block, (zeros, zeros), jnp.arange(tp // bq))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, tp, nq, d)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dsink.sum(axis=0).reshape(nq).astype(sinks.dtype), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
