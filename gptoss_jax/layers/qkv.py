"""The fused q/k/v layout: one tensor per layer instead of three, grouped by KV head.

``qkv`` [..., nkv, G + 2, D] with G = nq / nkv holds, for KV head ``g``, its G query heads
``g*G .. g*G + G-1`` (slots 0..G-1), then its key (slot G), then its value (slot G+1). Leading axes
are free: the kernel is [H, nkv, G+2, D], the bias [nkv, G+2, D], a projection's output
[B, T, nkv, G+2, D]. Query head ``h = g*G + j`` uses KV head ``g`` (grouped-query attention), so
splitting the tensor over its KV-head axis (tensor parallelism) keeps each query head with its KV head.
Works on NumPy and JAX arrays (``xp``: the array module for :func:`fuse_qkv`).
"""
from __future__ import annotations

import numpy as np

PARTS = ("q", "k", "v")


def fuse_qkv(q, k, v, xp=np):
    """q [..., nq, D], k/v [..., nkv, D] -> [..., nkv, nq/nkv + 2, D]."""
    *lead, nq, d = q.shape
    nkv = k.shape[-2]
    if k.shape != v.shape or tuple(k.shape[:-2]) != tuple(lead) or k.shape[-1] != d or nq % nkv:
        raise ValueError(f"cannot fuse q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need "
                         f"q [..., nq, D] and k, v [..., nkv, D] with nkv dividing nq")
    qg = q.reshape(*lead, nkv, nq // nkv, d)
    return xp.concatenate([qg, k[..., None, :], v[..., None, :]], axis=-2)


def split_qkv(qkv):
    """Inverse of :func:`fuse_qkv`: [..., nkv, G + 2, D] -> (q [..., nkv*G, D], k [..., nkv, D], v [..., nkv, D])."""
    *lead, nkv, slots, d = qkv.shape
    g = slots - 2
    return qkv[..., :g, :].reshape(*lead, nkv * g, d), qkv[..., g, :], qkv[..., g + 1, :]


def slot(part: str, groups: int) -> slice | int:
    """Index of ``part`` ('q', 'k' or 'v') along the slot axis (q: the slice of its ``groups`` heads)."""
    return {"q": slice(0, groups), "k": groups, "v": groups + 1}[part]
