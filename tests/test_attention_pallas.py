"""The Pallas attention kernel (Mosaic TPU and Triton GPU bodies, run in Pallas interpret mode) against
the exact path: values with sinks, padding, GQA (3 query heads per KV head), the window boundary, a
prefill chunk against a wrapped ring with a per-row start, segment ids, gradients, and the path choice.

Tolerance (float32), as in tests/test_flash.py: both paths compute float32 probabilities of the same
float32 scores (HIGHEST-precision dots) and average float32 values; they differ in summation order and
in the kernel's rescaling by exp(m - m_new) once per key block: a few float32 roundings (2^-24
relative) of sums bounded by max|v| over <= 5 blocks and <= 60 keys, |difference| <= ~50 * 2^-24 *
max|v| ~ 3e-6 max|v|, so 1e-5 * max(1, max|reference|) holds while a wrong mask, sink or rescale
(errors of order max|v|) fails it. Shapes are tiny and blocks small (T, S multiples of neither block).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import platform as gptoss_platform
from gptoss_jax.kernels.flash_attention import flash_attention, kernel_choice
from gptoss_jax.config import ATTENTION_IMPLS
from gptoss_jax.layers.attention import attend_kv_major, attention_kv_major, attention_path, mesh_aware

SINKS = jnp.asarray([20.0, -20.0, 8.0, 0.0, -3.0, 12.0], jnp.float32)  # dominating, vanishing, ordinary
B, NQ, NKV, D = 2, 6, 2, 16
BLOCKS = dict(block_q=8, block_k=16)
BAND_BLOCKS = dict(block_q=8, block_k=8)  # window 8, T 37: a band of 4 key steps < 5 key blocks (TPU)


_exact = jax.jit(attention_kv_major, static_argnums=6)  # one compile per call shape, not one per op


def _close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()
    np.testing.assert_array_less(np.abs(got - want).max(), 1e-5 * max(1.0, np.abs(want).max()))


def _normal(seed, *shape):
    """float32 normal samples from numpy (eager jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _qkv(t, s=None, seed=0):
    s = t if s is None else s
    return _normal(seed, B, t, NQ, D), _normal(seed + 100, B, NKV, s, D), _normal(seed + 200, B, NKV, s, D)


def _kernel(backend, window, blocks=BLOCKS):
    """The kernel in interpret mode, jitted as one program (one compile per test)."""
    return jax.jit(lambda q, k, v, s, qp, kp: flash_attention(q, k, v, s, qp, kp, window, backend=backend,
                                                              interpret=True, **blocks))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_window_padding_and_boundary(backend):
    """Row 0: positions 0..36, key 3's values 1000 (visible to queries 3..10 with window 8, so query 11,
    exactly the window away, must not see it); row 1: 5 padding slots, positions, 3 padding slots
    (padded queries give 0). TPU: the banded grid (4 key steps of 5 blocks)."""
    t, w = 37, 8
    q, k, v = _qkv(t)
    v = np.array(v)
    v[0, :, 3] = 1000.0
    v = jnp.asarray(v)
    row1 = np.full(t, -1)
    row1[5:t - 3] = np.arange(t - 8)
    pos = jnp.asarray(np.stack([np.arange(t), row1]), jnp.int32)
    got = _kernel(backend, w, BAND_BLOCKS)(q, k, v, SINKS, pos, pos)
    _close(got, _exact(q, k, v, SINKS, pos, pos, w))
    got = np.asarray(got)
    assert np.abs(got[0, 10]).max() > 1 and np.abs(got[0, 11]).max() < 50  # 10 - 8 < 3; 11 - 8 = 3
    assert np.all(got[1, :5] == 0) and np.all(got[1, -3:] == 0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_segments_full_causal_values_and_gradients(backend):
    """Packed sequences (positions restart per segment), window 0; gradients via the blocked backward."""
    t = 30
    q, k, v = _qkv(t, seed=1)
    seg = jnp.asarray([[0] * 12 + [1] * 18, [0] * 7 + [1] * 9 + [2] * 14], jnp.int32)
    starts = np.asarray([[0] * 12 + [12] * 18, [0] * 7 + [7] * 9 + [16] * 14])
    pos = jnp.asarray(np.arange(t)[None] - np.asarray(starts), jnp.int32)
    weight = _normal(2, B, t, NQ, D)

    def loss(fn):
        def f(q, k, v, s):
            out = fn(q, k, v, s, pos, pos, 0, seg, seg)
            return (out * weight).sum(), out
        return jax.jit(f)

    kernel = lambda *a: flash_attention(*a, backend=backend, interpret=True, **BLOCKS)  # noqa: E731
    (_, want_out), want_g = jax.value_and_grad(loss(attention_kv_major), (0, 1, 2, 3), has_aux=True)(q, k, v, SINKS)
    (_, got_out), got_g = jax.jit(jax.value_and_grad(loss(kernel), (0, 1, 2, 3), has_aux=True))(q, k, v, SINKS)
    _close(got_out, want_out)
    for g, w_ in zip(got_g, want_g):
        _close(g, w_)


def test_prefill_chunk_against_ring_with_row_offsets():
    """A sliding layer's prefill chunk: the ring before the chunk (wrapped: positions out of slot order;
    row 1 fresh: empty slots, -1) then the chunk, whose start differs per row (21 and 0)."""
    w, t = 8, 20
    q, kc, vc = _qkv(t, seed=5)
    ring_k, ring_v = _normal(6, 2, B, NKV, w, D)
    start = 21  # row 0's ring holds positions 13..20 at slots pos % 8
    ring0 = [[p for p in range(start - w, start) if p % w == slot][0] for slot in range(w)]
    ring_pos = jnp.asarray([ring0, [-1] * w], jnp.int32)
    keys, values = (jnp.asarray(np.concatenate([r, c], axis=2)) for r, c in ((ring_k, kc), (ring_v, vc)))
    q_pos = jnp.asarray([np.arange(start, start + t), np.arange(t)], jnp.int32)
    k_pos = jnp.asarray(np.concatenate([ring_pos, q_pos], axis=1))
    want = _exact(q, keys, values, SINKS, q_pos, k_pos, w)
    _close(_kernel("tpu", w)(q, keys, values, SINKS, q_pos, k_pos), want)


def test_path_choice():
    """'auto' takes the kernel for several queries over more than one key block when tracing for a TPU or
    GPU; decode (one query) there takes the exact path over the keys it is given (the step's length
    bucket: a static program); programs of unknown platform keep the blocked path, as does decode on
    the CPU; 'pallas' on CPU is the kernel in interpret mode."""
    assert attention_path("auto", 4096, 64) == "blocked"  # platform unknown
    for p in ("tpu", "gpu"):
        with gptoss_platform.lowering_for(p):
            assert attention_path("auto", 4096, 64) == "pallas"
            assert attention_path("auto", 4096, 1) == "xla" and attention_path("pallas", 4096, 1) == "xla"
            assert attention_path("blocked", 4096, 1) == "blocked"
            assert attention_path("auto", 512, 64) == "xla" and attention_path("blocked", 4096, 64) == "blocked"
            assert kernel_choice() == (p, False)
    with gptoss_platform.lowering_for("cpu"):
        assert attention_path("auto", 4096, 64) == "blocked" and attention_path("pallas", 8, 8) == "pallas"
        assert attention_path("auto", 4096, 1) == "blocked"
        assert kernel_choice() == ("tpu", True)
        q, k, v = _qkv(8, 600)
        pos = jnp.asarray(np.broadcast_to(np.arange(8, dtype=np.int32), (B, 8)))
        kpos = jnp.asarray(np.broadcast_to(np.arange(600, dtype=np.int32), (B, 600)))
        jaxpr = str(jax.make_jaxpr(lambda *a: attend_kv_major(*a, 0, impl="pallas"))(q, k, v, SINKS, pos, kpos))
        assert "pallas_call" in jaxpr
        jaxpr = str(jax.make_jaxpr(lambda *a: attend_kv_major(*a, 0, impl="auto"))(q, k, v, SINKS, pos, kpos))
        assert "pallas_call" not in jaxpr
    with pytest.raises(ValueError, match="GPTOSS_ATTENTION_KERNEL"):
        kernel_choice("mosaic")


def test_auto_keeps_blocked_path_on_a_mesh_and_aot_knows_the_impls():
    """A model on a mesh (``layout`` set) keeps 'auto' off the kernel (not partitioned by XLA)."""
    from benchmarks import aot

    class Model:
        def __init__(self, layout):
            self.layout = layout

        @mesh_aware
        def hidden_states(self):
            return attention_path("auto", 4096, 64)

    with gptoss_platform.lowering_for("tpu"):
        assert Model(object()).hidden_states() == "blocked" and Model(None).hidden_states() == "pallas"
        assert attention_path("pallas", 4096, 64) == "pallas"
    assert aot.ATTENTION_IMPLS == ATTENTION_IMPLS


@pytest.mark.slow
def test_model_chunked_prefill_through_the_kernel(tiny_model):
    """The tiny model with every layer on 'pallas' (the kernel in interpret mode; platform chosen by
    XLA when lowering, every branch traced: the TPU and GPU branches, which cannot tile the tiny heads, take
    the blocked path): a chunked prefill through the cache (ring + chunk for sliding layers, the cache for
    full ones, padding in row 1) and a forward without a cache match the exact path. Each call is one
    jitted program (op by op, the interpreted kernel's grid dominated the suite)."""
    from flax import nnx

    from gptoss_jax.layers.attention import set_attention

    model = nnx.clone(tiny_model)
    rng = np.random.default_rng(10)
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (B, 24)), jnp.int32)
    row1 = np.full(24, -1)
    row1[4:] = np.arange(20)
    pos = jnp.asarray(np.stack([np.arange(24), row1]), jnp.int32)
    step = nnx.jit(lambda m, t, p, c: m(t, p, c))

    def run(impl):
        set_attention(model, impl)
        cache = model.init_cache(B, 32)
        outs = []
        for a, b in ((0, 10), (10, 24)):
            logits, cache = step(model, tokens[:, a:b], pos[:, a:b], cache)
            outs.append(logits)
        full, _ = step(model, tokens, pos, None)
        return jnp.concatenate(outs, axis=1), full

    want, want_full = run("xla")
    got, got_full = run("pallas")
    valid = np.asarray(pos) >= 0
    _close(np.asarray(got)[valid], np.asarray(want)[valid])
    _close(np.asarray(got_full)[valid], np.asarray(want_full)[valid])
