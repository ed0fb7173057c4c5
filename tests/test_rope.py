"""YaRN RoPE against transformers: inverse frequencies, concentration, cos/sin tables, rotation."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GptOssConfig as HFConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, apply_rotary_pos_emb

from gptoss_jax.config import PRESETS, yarn_correction_range
from gptoss_jax.layers.rope import apply_rope, rope_tables, yarn_inv_freq
from tests.reference import to_np


def _hf_config(cfg):
    return HFConfig(**cfg.to_hf_dict(quantized=False))


@pytest.mark.parametrize("preset", ["tiny", "gpt-oss-20b"])
def test_inv_freq_and_concentration_match_transformers_yarn(preset):
    cfg = PRESETS[preset]
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(cfg))
    # torch's float32 pow is not correctly rounded: a few entries differ by one ulp
    np.testing.assert_array_max_ulp(yarn_inv_freq(cfg), inv_freq.numpy(), maxulp=1)
    assert cfg.concentration == pytest.approx(factor, rel=1e-12)
    low, high = yarn_correction_range(cfg)
    assert 0 < low < high < cfg.head_dim / 2 - 1  # YaRN really blends inside the head (no rounding)
    if preset == "gpt-oss-20b":
        # the 20b range is not an integer pair: rounding it (the vLLM bug) would change the ramp
        assert low % 1 > 0.01 and high % 1 > 0.01


def test_cos_sin_tables_match_transformers(reference_run):
    tokens, _, records, _ = reference_run
    _, _, (cos, sin) = records["model.rotary_emb"]
    pos = jnp.arange(tokens.shape[1])[None]  # transformers shares one table across the batch
    ours_cos, ours_sin = rope_tables(pos, PRESETS["tiny"])
    np.testing.assert_allclose(np.asarray(ours_cos), to_np(cos), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_sin), to_np(sin), rtol=0, atol=1e-6)


def test_tables_far_positions_20b():
    """Up to the 131072-token context of the real models."""
    cfg = PRESETS["gpt-oss-20b"]
    rot = GptOssRotaryEmbedding(_hf_config(cfg))
    pos = np.array([[0, 1, 127, 128, 4095, 4096, 65535, 131071]])
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    ours_cos, ours_sin = rope_tables(jnp.asarray(pos), cfg)
    # angles reach 1.3e5 rad, where one float32 ulp of the angle is ~1e-2 rad for the fastest pair;
    # a one-ulp inverse-frequency difference moves slower pairs by pos * ulp(inv_freq)
    np.testing.assert_allclose(np.asarray(ours_cos), cos.numpy(), rtol=0, atol=2e-2)
    np.testing.assert_allclose(np.asarray(ours_sin), sin.numpy(), rtol=0, atol=2e-2)
    np.testing.assert_allclose(np.asarray(ours_cos)[0, :6], cos.numpy()[0, :6], rtol=0, atol=2e-4)
    np.testing.assert_allclose(np.asarray(ours_cos)[0, :4], cos.numpy()[0, :4], rtol=0, atol=3e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_half_split_like_transformers(dtype):
    rng = np.random.default_rng(0)
    cfg = PRESETS["tiny"]
    q = rng.standard_normal((2, 5, 6, cfg.head_dim)).astype(np.float32)  # [B, T, heads, D]
    pos = np.arange(5)[None].repeat(2, 0) * 37
    cos, sin = rope_tables(jnp.asarray(pos), cfg)
    tq = torch.from_numpy(q).to(dtype).transpose(1, 2)  # transformers: [B, heads, T, D]
    tcos, tsin = torch.tensor(np.asarray(cos)).to(dtype), torch.tensor(np.asarray(sin)).to(dtype)
    ref, _ = apply_rotary_pos_emb(tq, tq, tcos, tsin)
    jdtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    ours = apply_rope(jnp.asarray(q, jdtype), cos, sin)
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), ref.transpose(1, 2).float().numpy())
