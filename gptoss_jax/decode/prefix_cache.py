"""Prefix caching: the KV of prompt blocks already computed is reused by later requests.

A prompt is cut into blocks of ``block`` tokens, the engine's prefill chunk, so a block is exactly one
prefill call's chunk and the cached values are bit for bit what a prefill would compute again. Each
block is named by a chained hash (the block's ids and its parent's hash: a block matches only with
everything before it). A pool entry holds, for the block's positions, every full-attention layer's
k/v ``[nkv, block, D]``, and, for every sliding-window layer, the whole ring (k/v ``[nkv, S, D]`` and
positions ``[S]``) as it stands at the block's end: a hit on blocks 0..n-1 restores the full layers'
blocks into their positions and the ring snapshot of block n-1 as is, so the ring semantics are kept
exactly (the snapshot holds the last ``window`` positions before the boundary).

A request matches at most ``(len(prompt) - 1) // block`` blocks (its last prompt token always runs,
for the first token's logits); the rest of the prompt is prefilled from the boundary, chunk for chunk
as an uncached request would. Each full chunk prefilled is saved into the pool (when not already
there), the least recently used entry evicted. Both device programs update their donated operand in
place (``dynamic_update_slice`` of one slot's rows, one pool entry), compiled once.
"""
from __future__ import annotations

import collections
import functools
import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.layers.kv_cache import LayerCache, cache_slots


class PoolLayer(NamedTuple):
    """One layer's entries: k, v [P, nkv, L, D] (L = block for full layers, the ring size for sliding
    ones); pos [P, L] the ring positions (sliding layers; unused for full ones)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


def block_hashes(prompt, block: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks: h_i = blake2b(h_{i-1} || ids of block i)."""
    out, prev = [], b""
    ids = np.asarray(prompt, np.int32)
    for start in range(0, len(ids) - block + 1, block):
        prev = hashlib.blake2b(prev + ids[start:start + block].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixCache:
    """A pool of ``blocks`` cached prompt blocks of ``block`` tokens for a :class:`Runner`'s cache,
    with LRU eviction. ``stats``: lookups, hit/miss blocks and tokens, saves, evictions."""

    def __init__(self, runner, blocks: int, block: int):
        if blocks < 1:
            raise ValueError(f"prefix cache blocks must be >= 1, got {blocks}")
        cfg = runner.config
        if block >= runner.context:
            raise ValueError(f"prefix cache block {block} must be smaller than the context {runner.context}")
        self.block, self.blocks = block, blocks
        self.sliding = tuple(cfg.window(i) > 0 for i in range(cfg.num_hidden_layers))
        self.pool = []
        for i in range(cfg.num_hidden_layers):
            size = cache_slots(cfg, i, runner.context) if self.sliding[i] else block
            shape = (blocks, cfg.num_key_value_heads, size, cfg.head_dim)
            self.pool.append(PoolLayer(jnp.zeros(shape, runner.dtype), jnp.zeros(shape, runner.dtype),
                                       jnp.full((blocks, size), -1, jnp.int32)))
        self.max_blocks = (runner.context - 1) // block
        self.entries: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # hash -> entry, LRU first
        self.free = list(range(blocks - 1, -1, -1))
        self.stats: collections.Counter = collections.Counter()

    def status(self) -> dict:
        s = self.stats
        looked = s["hit_tokens"] + s["miss_tokens"]
        return {"block_tokens": self.block, "blocks": self.blocks, "used": len(self.entries), **dict(s),
                "hit_rate": round(s["hit_tokens"] / looked, 4) if looked else 0.0}

    def lookup(self, hashes: list[bytes], prompt_tokens: int) -> list[int]:
        """Pool entries of the longest cached run of leading blocks (at most (prompt_tokens - 1) // block),
        marked recently used (parents after children, so children are evicted first)."""
        usable = hashes[:(prompt_tokens - 1) // self.block]
        hit = []
        for h in usable:
            if h not in self.entries:
                break
            hit.append(self.entries[h])
        for h in reversed(usable[:len(hit)]):
            self.entries.move_to_end(h)
        self.stats["lookups"] += 1
        self.stats["hit_blocks"] += len(hit)
        self.stats["miss_blocks"] += len(usable) - len(hit)
        self.stats["hit_tokens"] += len(hit) * self.block
        self.stats["miss_tokens"] += prompt_tokens - len(hit) * self.block
        return hit

    def restore(self, state, slot: int, entries: list[int]):
        """``state`` (a DecodeState, donated) with the slot's cache rows holding ``entries`` (blocks 0..n-1)."""
        ids = np.zeros(self.max_blocks, np.int32)
        ids[:len(entries)] = entries
        cache = _restore(self.sliding, state.cache, self.pool, np.int32(slot), ids, np.int32(len(entries)))
        return state._replace(cache=cache)

    def save(self, state, slot: int, hashes: list[bytes], index: int) -> None:
        """Store block ``index`` of the slot's rows (just prefilled) under ``hashes[index]``, unless present;
        its ancestors are then marked more recently used than it (children are evicted before parents)."""
        h = hashes[index]
        if h not in self.entries:
            if self.free:
                entry = self.free.pop()
            else:
                _, entry = self.entries.popitem(last=False)
                self.stats["evictions"] += 1
            self.entries[h] = entry
            self.pool = _save(self.sliding, self.pool, state.cache, np.int32(slot), np.int32(index * self.block),
                              np.int32(entry))
            self.stats["saves"] += 1
        for a in reversed(hashes[:index + 1]):
            if a in self.entries:
                self.entries.move_to_end(a)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _save(sliding, pool: list[PoolLayer], cache: list[LayerCache], slot, start, entry) -> list[PoolLayer]:
    """pool[entry] = the slot's block at ``start`` (full layers) / its ring (sliding layers)."""
    out = []
    for is_ring, p, c in zip(sliding, pool, cache):
        _, nkv, size, d = p.k.shape
        zero = jnp.int32(0)
        at = zero if is_ring else start
        k = jax.lax.dynamic_slice(c.k, (slot, zero, at, zero), (1, nkv, size, d)).astype(p.k.dtype)
        v = jax.lax.dynamic_slice(c.v, (slot, zero, at, zero), (1, nkv, size, d)).astype(p.v.dtype)
        pos = jax.lax.dynamic_slice(c.pos, (slot, at), (1, size))
        out.append(PoolLayer(jax.lax.dynamic_update_slice(p.k, k, (entry, zero, zero, zero)),
                             jax.lax.dynamic_update_slice(p.v, v, (entry, zero, zero, zero)),
                             jax.lax.dynamic_update_slice(p.pos, pos, (entry, zero))))
    return out


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _restore(sliding, cache: list[LayerCache], pool: list[PoolLayer], slot, ids, n) -> list[LayerCache]:
    """The slot's rows: full layers get entries ``ids[:n]`` at blocks 0..n-1 and positions 0..n*block-1
    (the rest emptied); sliding layers the ring of entry ``ids[n-1]``."""
    zero = jnp.int32(0)
    last = ids[jnp.maximum(n - 1, 0)]
    out = []
    for is_ring, p, c in zip(sliding, pool, cache):
        _, nkv, size, d = p.k.shape
        if is_ring:
            take = lambda a: jax.lax.dynamic_slice(a, (last, zero, zero, zero), (1, nkv, size, d))  # noqa: E731
            out.append(LayerCache(jax.lax.dynamic_update_slice(c.k, take(p.k).astype(c.k.dtype), (slot, zero, zero, zero)),
                                  jax.lax.dynamic_update_slice(c.v, take(p.v).astype(c.v.dtype), (slot, zero, zero, zero)),
                                  jax.lax.dynamic_update_slice(c.pos, jax.lax.dynamic_slice(p.pos, (last, zero), (1, size)),
                                                               (slot, zero))))
            continue

        def body(i, kv):
            k, v = kv
            at = (slot, zero, i * size, zero)
            src = (ids[i], zero, zero, zero)
            return (jax.lax.dynamic_update_slice(k, jax.lax.dynamic_slice(p.k, src, (1, nkv, size, d)).astype(k.dtype), at),
                    jax.lax.dynamic_update_slice(v, jax.lax.dynamic_slice(p.v, src, (1, nkv, size, d)).astype(v.dtype), at))

        k, v = jax.lax.fori_loop(0, n, body, (c.k, c.v))
        s = c.pos.shape[1]
        held = jnp.arange(s, dtype=jnp.int32)
        pos = jnp.where(held < n * size, held, -1)[None]
        out.append(LayerCache(k, v, jax.lax.dynamic_update_slice(c.pos, pos, (slot, zero))))
    return out
