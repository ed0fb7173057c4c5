"""Per-layer KV cache. Full-attention layers hold ``context`` slots; sliding-window layers hold only
``window`` slots used as a ring buffer (slot = position % window). Keys are stored after RoPE.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax.config import GptOssConfig


class LayerCache(NamedTuple):
    """k, v [B, S, nkv, D]; pos [B, S] int32 position held by each slot (-1 = empty)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


def cache_slots(cfg: GptOssConfig, layer: int, context: int) -> int:
    """Slots for ``layer``: the window for sliding layers (never more than the context)."""
    w = cfg.window(layer)
    return min(w, context) if w > 0 else context


def init_cache(cfg: GptOssConfig, batch: int, context: int, dtype=jnp.bfloat16) -> list[LayerCache]:
    """Empty caches for every layer, sized for sequences of up to ``context`` tokens."""
    caches = []
    for layer in range(cfg.num_layers):
        s = cache_slots(cfg, layer, context)
        shape = (batch, s, cfg.num_kv_heads, cfg.head_dim)
        caches.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                 jnp.full((batch, s), -1, jnp.int32)))
    return caches


def update_cache(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Write new k/v [B, T, nkv, D] at ``positions`` [B, T] (<0 = padding, not written).

    A chunk longer than the ring keeps only its last ``S`` positions, so every write is unique.
    """
    b, t = positions.shape
    s = cache.pos.shape[1]
    last = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > last - s)
    slot = jnp.where(keep, positions % s, s)  # s is out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return LayerCache(
        cache.k.at[rows, slot].set(k.astype(cache.k.dtype), mode="drop"),
        cache.v.at[rows, slot].set(v.astype(cache.v.dtype), mode="drop"),
        cache.pos.at[rows, slot].set(positions, mode="drop"),
    )
