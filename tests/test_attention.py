"""Attention with sinks, GQA, sliding window and padding against transformers' GptOssAttention."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from gptoss_jax.layers.attention import attention_mask
from gptoss_jax.layers.rope import rope_tables
from tests.reference import to_np

LARGE_SINKS = [20.0, -20.0, 8.0, 0.0, -3.0, 12.0]  # a small sink vanishes in rounding; these do not


def _ours(model, layer, x, positions):
    cos, sin = rope_tables(jnp.maximum(jnp.asarray(positions), 0), model.config)
    out, _ = model.layers[layer].attn(jnp.asarray(x, jnp.float32), cos, sin, jnp.asarray(positions, jnp.int32))
    return np.asarray(out)


@pytest.mark.parametrize("layer", [0, 1, 2])  # sliding, full, sliding
def test_attention_matches_reference_on_its_activations(layer, reference_run, tiny_model):
    tokens, mask, records, positions = reference_run
    assert tiny_model.config.is_sliding(layer) == (layer % 2 == 0)
    _, kwargs, (out, _) = records[f"model.layers.{layer}.self_attn"]
    ours = _ours(tiny_model, layer, to_np(kwargs["hidden_states"]), positions)
    valid = mask.astype(bool)  # padded query rows are undefined in both
    np.testing.assert_allclose(ours[valid], to_np(out)[valid], rtol=0, atol=2e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_large_sinks_against_float64_reference(layer, reference_run, hf_reference, tiny_hf):
    """With sinks of +-20 the sink dominates or vanishes from the denominator; compare our float32
    attention with transformers' attention module run in float64 on the same inputs."""
    from gptoss_jax import load

    _, mask, records, positions = reference_run
    _, kwargs, _ = records[f"model.layers.{layer}.self_attn"]
    ref = copy.deepcopy(hf_reference.model.layers[layer].self_attn).double()
    ref.sinks.data = torch.tensor(LARGE_SINKS, dtype=torch.float64)
    as64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()
            if k in ("hidden_states", "attention_mask")}
    cos, sin = kwargs["position_embeddings"]
    with torch.no_grad():
        want, _ = ref(position_embeddings=(cos.double(), sin.double()), **as64)
    ours = load(tiny_hf, dtype=jnp.float32)
    ours.layers[layer].attn.sinks.set_value(jnp.asarray(LARGE_SINKS, jnp.float32))
    got = _ours(ours, layer, to_np(kwargs["hidden_states"]), positions)
    valid = mask.astype(bool)
    want = want.numpy()[valid]
    assert np.abs(got[valid] - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("window", [0, 8, 128])
def test_mask_is_transformers_mask(window):
    """Key j visible to query i iff i - window < j <= i (the window counts the query itself)."""
    t = 300
    fn = sliding_window_causal_mask_function(window) if window else causal_mask_function
    q, k = torch.meshgrid(torch.arange(t), torch.arange(t), indexing="ij")
    ref = fn(0, 0, q, k).numpy()
    pos = jnp.arange(t)[None]
    ours = np.asarray(attention_mask(pos, pos, window))[0]
    np.testing.assert_array_equal(ours, ref)
    if window:
        assert ours[200, 200 - window + 1] and not ours[200, 200 - window]


def test_padding_and_empty_slots_are_invisible():
    pos = jnp.asarray([[-1, -1, 0, 1, 2]])
    m = np.asarray(attention_mask(pos, pos, 0))[0]
    assert not m[:, :2].any()  # padded keys never visible
    assert not m[:2].any()  # padded queries see nothing (their output is just the sink-weighted zero)
    np.testing.assert_array_equal(m[2:, 2:], np.tril(np.ones((3, 3), bool)))


def test_project_out_contracts_both_axes_off_cpu_with_the_same_values():
    """Off the CPU the output projection contracts (heads, head_dim) as stored (TPU would otherwise
    convert the reshaped kernel to float32 every call); the CPU form merges them first. Same values."""
    from gptoss_jax import platform
    from gptoss_jax.layers.attention import project_out

    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.integers(-3, 4, (2, 3, 4, 8)), jnp.float32)
    w = jnp.asarray(rng.integers(-3, 4, (4, 8, 16)), jnp.float32)

    def run(target):
        def f(out, w):
            with platform.lowering_for(target):
                return project_out(out, w)
        return str(jax.make_jaxpr(f)(out, w)), np.asarray(jax.jit(f)(out, w))

    (tpu_jaxpr, tpu), (cpu_jaxpr, cpu) = run("tpu"), run("cpu")
    assert "reshape" not in tpu_jaxpr and "reshape" in cpu_jaxpr
    np.testing.assert_array_equal(tpu, cpu)
    np.testing.assert_array_equal(cpu, np.einsum("btnd,ndh->bth", np.asarray(out), np.asarray(w)))


@pytest.mark.parametrize("layer", [0, 1])  # sliding (a ring), full
def test_gpu_decode_step_computes_qkv_and_scores_once_with_the_same_values(layer):
    """In a program for the GPU, a decode step's fused q/k/v output and its scores go through an
    optimization barrier (``computed_once``: XLA:GPU's rematerialization recomputed the scores' dot per
    softmax pass and the projection for the cache write, reading the keys and the weight again); the
    CPU program has none. Same output and cache either way (small integers: every product and sum exact)."""
    from flax import nnx

    from gptoss_jax import get_preset, platform
    from gptoss_jax.layers.attention import Attention
    from gptoss_jax.layers.kv_cache import init_cache, update_cache

    cfg = get_preset("tiny")
    attn = Attention(cfg, layer, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(layer)
    for p in (attn.qkv_kernel, attn.qkv_bias, attn.o_kernel, attn.o_bias, attn.sinks):
        p.set_value(jnp.asarray(rng.integers(-2, 3, p.shape), jnp.float32) / 4)
    b, context = 3, 12
    shape = (b, 5, cfg.num_key_value_heads, cfg.head_dim)
    cache = update_cache(init_cache(cfg, b, context, jnp.float32)[layer],
                         jnp.asarray(rng.integers(-2, 3, shape), jnp.float32),
                         jnp.asarray(rng.integers(-2, 3, shape), jnp.float32), jnp.arange(5)[None, :].repeat(b, 0))
    x = jnp.asarray(rng.integers(-2, 3, (b, 1, cfg.hidden_size)), jnp.float32) / 4
    cos = jnp.ones((b, 1, cfg.head_dim // 2), jnp.float32)
    sin = jnp.zeros((b, 1, cfg.head_dim // 2), jnp.float32)
    positions = jnp.asarray([[5], [-1], [5]], jnp.int32)

    def run(target):
        def f(x, cache):
            with platform.lowering_for(target):
                return attn(x, cos, sin, positions, cache, kv_len=8)
        return str(jax.make_jaxpr(f)(x, cache)), jax.jit(f)(x, cache)

    (gpu_jaxpr, (gpu, gpu_cache)), (cpu_jaxpr, (cpu, cpu_cache)) = run("gpu"), run("cpu")
    assert gpu_jaxpr.count("optimization_barrier") == 2 and "optimization_barrier" not in cpu_jaxpr
    np.testing.assert_array_equal(np.asarray(gpu), np.asarray(cpu))
    for a, c in zip(gpu_cache, cpu_cache):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
