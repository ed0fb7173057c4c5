"""Per-layer KV cache. Full-attention layers hold ``context`` slots; sliding-window layers hold only
``window`` slots used as a ring buffer (slot = position % window). Keys are stored after RoPE.

Layout [B, nkv, S, D] (kv heads before slots): attention contracts each kv head's keys as one
contiguous [S, D] matrix, with no transposed copy of the cache per step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax.config import GptOssConfig


class LayerCache(NamedTuple):
    """k, v [B, nkv, S, D]; pos [B, S] int32 position held by each slot (-1 = empty)."""

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
        shape = (batch, cfg.num_kv_heads, s, cfg.head_dim)
        caches.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                 jnp.full((batch, s), -1, jnp.int32)))
    return caches


def cache_bytes(cfg: GptOssConfig, batch: int, context: int, dtype=jnp.bfloat16) -> int:
    """Bytes of :func:`init_cache`'s arrays (k, v and positions of every layer)."""
    caches = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype))
    return sum(a.size * a.dtype.itemsize for c in caches for a in c)


def update_cache(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Write new k/v [B, T, nkv, D] at ``positions`` [B, T] (<0 = padding, not written).

    A chunk longer than the ring keeps only its last ``S`` positions, so every write is unique.
    """
    b, t = positions.shape
    s = cache.pos.shape[1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    if t == 1:  # decode: every row writes one slot; padding rows rewrite what slot 0 holds. Scatters
        # that may drop writes cannot update in place (XLA copies the whole cache around them).
        keep = positions >= 0
        slot = jnp.where(keep, positions % s, 0)
        mode = "promise_in_bounds"
    else:  # a chunk longer than the ring keeps only its last S positions, so every write is unique
        last = jnp.max(positions, axis=1, keepdims=True)
        keep = (positions >= 0) & (positions > last - s)
        slot = jnp.where(keep, positions % s, s)  # s is out of range: dropped
        mode = "drop"

    def write(buf, new):  # buf[rows, :, slot] = new; 16-bit values as raw bits (XLA:CPU scatters
        # bf16 through a float32 copy of the whole cache)
        raw = jnp.uint16 if buf.dtype.itemsize == 2 else buf.dtype
        buf = jax.lax.bitcast_convert_type(buf, raw)
        new = jax.lax.bitcast_convert_type(new.astype(cache.k.dtype), raw)
        if mode != "drop":
            new = jnp.where(keep[:, :, None, None], new, buf[rows, :, slot])
        return jax.lax.bitcast_convert_type(buf.at[rows, :, slot].set(new, mode=mode), cache.k.dtype)

    pos = jnp.where(keep, positions, cache.pos[rows, slot]) if mode != "drop" else positions
    return LayerCache(write(cache.k, k), write(cache.v, v), cache.pos.at[rows, slot].set(pos, mode=mode))
