"""Blocked (flash-style) attention against the exact path: values, gradients, visited blocks, memory.

Tolerance: both paths compute float32 probabilities of the same scores and average float32 values;
they differ only in summation order and in the blocked path's rescaling by exp(m - m_new) once per
key block. Each of those is a few float32 roundings (2^-24 relative) of a sum bounded by
max|v|, over at most ~10 blocks and ~100 keys: |difference| <= ~50 * 2^-24 * max|v| ~ 3e-6 max|v|,
so 1e-5 * max(1, max|reference|) holds on any CPU while a wrong mask, sink or rescale (errors of
order max|v|) fails it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.layers.attention import attend_kv_major, attention_kv_major, attention_path, set_attention
from gptoss_jax.layers.flash import block_attention_kv_major, block_ranges
from gptoss_jax.layers.kv_cache import LayerCache, update_cache

SINKS = jnp.asarray([20.0, -20.0, 8.0, 0.0, -3.0, 12.0], jnp.float32)  # dominating, vanishing, ordinary
B, NQ, NKV, D = 2, 6, 2, 20


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()
    np.testing.assert_array_less(np.abs(got - want).max(), 1e-5 * max(1.0, np.abs(want).max()))


def _qkv(t, s=None, seed=0):
    s = t if s is None else s
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, t, NQ, D)), jax.random.normal(kk, (B, NKV, s, D)),
            jax.random.normal(kv, (B, NKV, s, D)))


def _padded_positions(t, left, right):
    """Row 0: 0..t-1; row 1: ``left`` padding slots, then positions, then ``right`` padding slots."""
    row1 = np.full(t, -1)
    row1[left:t - right] = np.arange(t - left - right)
    return jnp.asarray(np.stack([np.arange(t), row1]), jnp.int32)


@pytest.mark.parametrize("window", [0, 8, 9])
@pytest.mark.parametrize("blocks", [(8, 6), (5, 16), (64, 64)])  # T=37 a multiple of neither; one block
def test_self_attention_matches_exact(window, blocks):
    t = 37
    q, k, v = _qkv(t)
    pos = _padded_positions(t, left=5, right=3)
    want = attention_kv_major(q, k, v, SINKS, pos, pos, window)
    got = block_attention_kv_major(q, k, v, SINKS, pos, pos, window, block_q=blocks[0], block_k=blocks[1])
    _close(got, want)
    assert np.all(np.asarray(got)[1, :5] == 0) and np.all(np.asarray(got)[1, -3:] == 0)  # padded rows: 0


def test_window_boundary_is_exact():
    """A query sees the key window - 1 back and not the one window back, whatever the block edges."""
    t, w = 24, 8
    q, k, v = _qkv(t)
    v = v.at[:, :, 3].set(1000.0)  # key 3: visible to queries 3..10 only
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    got = np.asarray(block_attention_kv_major(q, k, v, SINKS, pos, pos, w, block_q=4, block_k=4))
    _close(got, attention_kv_major(q, k, v, SINKS, pos, pos, w))
    assert np.abs(got[:, 11]).max() < 50 and np.abs(got[:, 10]).max() > 1  # 10 - 8 < 3; 11 - 8 = 3


def test_segments_match_exact():
    t = 30
    q, k, v = _qkv(t)
    seg = jnp.asarray([[0] * 12 + [1] * 18, [0] * 7 + [1] * 9 + [2] * 14], jnp.int32)
    starts = jnp.asarray([[0] * 12 + [12] * 18, [0] * 7 + [7] * 9 + [16] * 14])
    pos = (jnp.arange(t)[None] - starts).astype(jnp.int32)  # positions restart in every segment
    for window in (0, 4):
        want = attention_kv_major(q, k, v, SINKS, pos, pos, window, seg, seg)
        _close(block_attention_kv_major(q, k, v, SINKS, pos, pos, window, seg, seg, block_q=4, block_k=8), want)


def test_decode_reads_ring_after_wrap_around():
    """A ring of 8 slots written past its end (slot = pos % 8) read by one query per row."""
    w, s = 8, 8
    cache = LayerCache(jnp.zeros((B, NKV, s, D)), jnp.zeros((B, NKV, s, D)), jnp.full((B, s), -1, jnp.int32))
    kk, kv = jax.random.split(jax.random.PRNGKey(3))
    n = 13  # row 0: positions 0..12 (wrapped); row 1: 0..4 (not wrapped)
    ks, vs = jax.random.normal(kk, (B, n, NKV, D)), jax.random.normal(kv, (B, n, NKV, D))
    pos = jnp.asarray([np.arange(n), np.where(np.arange(n) < 5, np.arange(n), -1)], jnp.int32)
    for i in range(n):
        cache = update_cache(cache, ks[:, i:i + 1], vs[:, i:i + 1], pos[:, i:i + 1])
    q = jax.random.normal(jax.random.PRNGKey(4), (B, 1, NQ, D))
    q_pos = jnp.asarray([[12], [4]], jnp.int32)
    want = attention_kv_major(q, cache.k, cache.v, SINKS, q_pos, cache.pos, w)
    _close(block_attention_kv_major(q, cache.k, cache.v, SINKS, q_pos, cache.pos, w, block_k=3), want)


@pytest.mark.slow
def test_chunk_against_ring_and_itself():
    """A prefill chunk of a sliding layer: the ring before the chunk (wrapped, unordered) + the chunk."""
    w, t = 8, 20
    q, kc, vc = _qkv(t, seed=5)
    ring_k, ring_v = jax.random.normal(jax.random.PRNGKey(6), (2, B, NKV, w, D))
    start = 21  # the ring holds positions 13..20 at slots pos % 8
    ring_pos = jnp.asarray([[p for p in range(start - w, start) if p % w == slot][0] for slot in range(w)])
    ring_pos = jnp.broadcast_to(ring_pos, (B, w)).astype(jnp.int32)
    keys, values = jnp.concatenate([ring_k, kc], axis=2), jnp.concatenate([ring_v, vc], axis=2)
    q_pos = jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (B, t))
    k_pos = jnp.concatenate([ring_pos, q_pos], axis=1)
    want = attention_kv_major(q, keys, values, SINKS, q_pos, k_pos, w)
    _close(block_attention_kv_major(q, keys, values, SINKS, q_pos, k_pos, w, block_q=4, block_k=4), want)


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 8])
def test_gradients_match_exact(window):
    t = 29
    q, k, v = _qkv(t, seed=7)
    pos = _padded_positions(t, left=3, right=2)
    seg = jnp.asarray([[0] * t, [0] * 15 + [1] * (t - 15)], jnp.int32)
    weight = jax.random.normal(jax.random.PRNGKey(8), (B, t, NQ, D))

    def loss(fn):
        return lambda q, k, v, s: (fn(q, k, v, s, pos, pos, window, seg, seg) * weight).sum()

    blocked = lambda *a: block_attention_kv_major(*a, block_q=4, block_k=6)  # noqa: E731
    want = jax.grad(loss(attention_kv_major), argnums=(0, 1, 2, 3))(q, k, v, SINKS)
    got = jax.grad(loss(blocked), argnums=(0, 1, 2, 3))(q, k, v, SINKS)
    for g, w_ in zip(got, want):
        _close(g, w_)


def test_visited_blocks_are_the_band_and_the_filled_slots():
    pos = jnp.arange(64, dtype=jnp.int32)[None]
    lo, hi = block_ranges(pos, pos, jnp.int32(0), jnp.int32(0), 0, 8, 8)
    np.testing.assert_array_equal(lo, 0)
    np.testing.assert_array_equal(hi, np.arange(1, 9))  # causal triangle
    lo, hi = block_ranges(pos, pos, jnp.int32(0), jnp.int32(0), 8, 8, 8)
    np.testing.assert_array_equal(lo, np.maximum(np.arange(8) - 1, 0))  # the window reaches one block back
    np.testing.assert_array_equal(hi, np.arange(1, 9))
    cache_pos = jnp.where(jnp.arange(64) < 10, jnp.arange(64), -1)[None].astype(jnp.int32)  # 10 of 64 filled
    lo, hi = block_ranges(jnp.asarray([[10]], jnp.int32), cache_pos, jnp.int32(0), jnp.int32(0), 0, 1, 8)
    assert (int(lo[0]), int(hi[0])) == (0, 2)  # decode reads 2 of 8 key blocks
    lo, hi = block_ranges(jnp.asarray([[-1]], jnp.int32), cache_pos, jnp.int32(0), jnp.int32(0), 0, 1, 8)
    assert int(hi[0]) == int(lo[0])  # an idle slot reads nothing


def test_blocked_memory_is_linear_in_length():
    """Compiled for XLA:CPU, the blocked prefill's temporaries stay below one head's T x S scores."""
    t = 4096
    q = jax.ShapeDtypeStruct((1, t, NQ, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, NKV, t, D), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
    sinks = jax.ShapeDtypeStruct((NQ,), jnp.float32)

    def temp(fn):
        return jax.jit(lambda q, k, v, s, p: fn(q, k, v, s, p, p, 0)).lower(q, kv, kv, sinks, pos).compile(
        ).memory_analysis().temp_size_in_bytes

    exact, blocked = temp(attention_kv_major), temp(block_attention_kv_major)
    assert exact >= NQ * t * t * 4  # the exact path holds [heads, T, S] float32 scores
    assert blocked < t * t * 4, (blocked, exact)


def test_path_choice_and_override():
    assert attention_path("auto", 512) == "xla" and attention_path("auto", 513) == "blocked"
    assert attention_path("xla", 10**6) == "xla" and attention_path("blocked", 8) == "blocked"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention_path("flash", 8)
    t = 40
    q, k, v = _qkv(t, seed=9)
    pos = _padded_positions(t, left=0, right=4)
    _close(attend_kv_major(q, k, v, SINKS, pos, pos, 8, impl="blocked"), attention_kv_major(q, k, v, SINKS, pos, pos, 8))


@pytest.mark.slow
def test_model_prefill_and_decode_blocked_match_exact(tiny_model, monkeypatch):
    """The tiny model through chunked prefill (ring + chunk for sliding layers, the cache for full
    ones) and decode past the ring, blocked (blocks of 8 and 4) vs exact."""
    from flax import nnx

    from gptoss_jax.layers import flash

    monkeypatch.setattr(flash, "BLOCK_Q", 8)
    monkeypatch.setattr(flash, "BLOCK_K", 4)
    model = nnx.clone(tiny_model)
    tokens = jax.random.randint(jax.random.PRNGKey(10), (2, 30), 0, model.config.vocab_size)
    pos = _padded_positions(30, left=4, right=0)

    def run(impl):
        set_attention(model, impl)
        cache = model.init_cache(2, 64)
        outs = []
        call = nnx.jit(lambda m, t, p, c: m(t, p, c))  # one program per call shape, not op-by-op dispatch
        for a, b in ((0, 12), (12, 29)):
            logits, cache = call(model, tokens[:, a:b], pos[:, a:b], cache)
            outs.append(logits)
        for i in range(29, 30):  # past the ring of 8
            logits, cache = call(model, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
            outs.append(logits)
        full, _ = call(model, tokens, pos, None)  # no cache: self-attention
        return jnp.concatenate(outs, axis=1), full

    want, want_full = run("xla")
    got, got_full = run("blocked")
    valid = np.asarray(pos) >= 0
    _close(np.asarray(got)[valid], np.asarray(want)[valid])
    _close(np.asarray(got_full)[valid], np.asarray(want_full)[valid])
