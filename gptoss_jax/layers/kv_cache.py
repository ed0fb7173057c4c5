"""Per-layer KV cache. Full-attention layers hold ``context`` slots; sliding-window layers hold only
``window`` slots used as a ring buffer (slot = position % window). Keys are stored after RoPE.

Layout [B, nkv, S, D] (kv heads before slots): attention contracts each kv head's keys as one
contiguous [S, D] matrix, with no transposed copy of the cache per step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss_jax import platform
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
    for layer in range(cfg.num_hidden_layers):
        s = cache_slots(cfg, layer, context)
        shape = (batch, cfg.num_key_value_heads, s, cfg.head_dim)
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
    Decode (T = 1): padding rows' writes are dropped (their slot index is out of range), so no old
    value is read and the scatter updates the donated cache in place, except in programs compiled
    for the CPU, where XLA copies the whole cache around a scatter that may drop writes: there
    padding rows rewrite what their slot 0 holds (:func:`gptoss_jax.platform.dependent`).
    """
    if positions.shape[1] == 1:
        return platform.dependent(cache, k, v, positions, cpu=_write_keeping_old, default=_write)
    return _write(cache, k, v, positions)


def _write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """The scatter of :func:`update_cache`, out-of-range writes dropped."""
    b, t = positions.shape
    s = cache.pos.shape[1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    last = jnp.max(positions, axis=1, keepdims=True)
    keep = (positions >= 0) & (positions > last - s)
    slot = jnp.where(keep, positions % s, s)  # s is out of range: dropped
    return LayerCache(_scatter(cache.k, rows, slot, k, "drop"), _scatter(cache.v, rows, slot, v, "drop"),
                      cache.pos.at[rows, slot].set(positions, mode="drop"))


def _write_keeping_old(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
    """Decode's write for XLA:CPU: every row writes one slot; padding rows rewrite what slot 0 holds."""
    b = positions.shape[0]
    s = cache.pos.shape[1]
    rows = jnp.arange(b)[:, None]
    keep = positions >= 0
    slot = jnp.where(keep, positions % s, 0)

    def old_or_new(buf, new):
        return jnp.where(keep[:, :, None, None], new.astype(buf.dtype), buf[rows, :, slot])

    mode = "promise_in_bounds"
    return LayerCache(_scatter(cache.k, rows, slot, old_or_new(cache.k, k), mode),
                      _scatter(cache.v, rows, slot, old_or_new(cache.v, v), mode),
                      cache.pos.at[rows, slot].set(jnp.where(keep, positions, cache.pos[rows, slot]), mode=mode))


def _scatter(buf: jax.Array, rows: jax.Array, slot: jax.Array, new: jax.Array, mode: str) -> jax.Array:
    """buf[rows, :, slot] = new ([B, T, nkv, D]). In a program for the CPU 16-bit values go as raw bits
    (XLA:CPU scatters bf16 through a float32 copy of the whole cache); elsewhere as they are: on TPU
    the bits' bitcast pins the cache to a layout other than the one attention reads, and XLA then
    relayouts the whole cache twice per step (8x the full layers' KV bytes at batch 1)."""
    def plain(buf, new):
        return buf.at[rows, :, slot].set(new.astype(buf.dtype), mode=mode)

    def as_bits(buf, new):
        raw = jnp.uint16 if buf.dtype.itemsize == 2 else buf.dtype
        bits = jax.lax.bitcast_convert_type(buf, raw)
        new = jax.lax.bitcast_convert_type(new.astype(buf.dtype), raw)
        return jax.lax.bitcast_convert_type(bits.at[rows, :, slot].set(new, mode=mode), buf.dtype)

    return platform.dependent(buf, new, cpu=as_bits, default=plain)
