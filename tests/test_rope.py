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
from tests.tolerance import EPS, assert_within

#: inverse frequencies: both sides compute the same float32 operations from the same inputs except pow
#: (NumPy's/libm's vs torch's, each within 1 ulp: 2 ulp apart), after which the interpolated path
#: (factor *, 1 /, * (1 - mask), +) rounds 4 more times, each able to round the differing values to
#: neighbours one more ulp apart: 2 + 4 = 6 ulp.
INV_FREQ_ULP = 6


def _hf_config(cfg):
    return HFConfig(**cfg.to_hf_dict(quantized=False))


@pytest.mark.parametrize("preset", ["tiny", "gpt-oss-20b"])
def test_inv_freq_and_concentration_match_transformers_yarn(preset):
    cfg = PRESETS[preset]
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(cfg))
    np.testing.assert_array_max_ulp(yarn_inv_freq(cfg), inv_freq.numpy(), maxulp=INV_FREQ_ULP)
    assert cfg.concentration == pytest.approx(factor, rel=1e-12)
    low, high = yarn_correction_range(cfg)
    assert 0 < low < high < cfg.head_dim / 2 - 1  # YaRN really blends inside the head (no rounding)
    if preset == "gpt-oss-20b":
        # the 20b range is not an integer pair: rounding it (the vLLM bug) would change the ramp
        assert low % 1 > 0.01 and high % 1 > 0.01


def _assert_tables_close(ours, ref, pos, cfg, ref_inv_freq):
    """cos/sin tables [1, T, D/2] against transformers' from its own inverse frequencies, per element:
    the angles pos * inv_freq differ by pos times the inverse frequencies' difference (bounded by
    the test above) plus each side's rounding of the product (1/2 ulp of the angle); cos and sin
    (<= 1 ulp each side of a value <= 1) and the product with the concentration c add 2 eps c."""
    inv = yarn_inv_freq(cfg)
    angle = np.float32(pos)[..., None] * inv
    c = np.float32(cfg.concentration)
    bound = c * (pos[..., None] * np.abs(inv - ref_inv_freq) + np.spacing(np.abs(angle)) + 2 * EPS)
    for name, a, b in zip(("cos", "sin"), ours, ref):
        assert_within(np.asarray(a), b, bound, name)


def test_cos_sin_tables_match_transformers(reference_run, hf_reference):
    tokens, _, records, _ = reference_run
    _, _, (cos, sin) = records["model.rotary_emb"]
    pos = np.arange(tokens.shape[1])[None]  # transformers shares one table across the batch
    ours = rope_tables(jnp.asarray(pos), PRESETS["tiny"])
    _assert_tables_close(ours, (to_np(cos), to_np(sin)), pos, PRESETS["tiny"],
                         hf_reference.model.rotary_emb.inv_freq.numpy())


def test_tables_far_positions_20b():
    """Up to the 131072-token context of the real models."""
    cfg = PRESETS["gpt-oss-20b"]
    rot = GptOssRotaryEmbedding(_hf_config(cfg))
    pos = np.array([[0, 1, 127, 128, 4095, 4096, 65535, 131071]])
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    # angles reach 1.3e5 rad, where one float32 ulp of the angle is ~1e-2 rad for the fastest pair
    _assert_tables_close(rope_tables(jnp.asarray(pos), cfg), (cos.numpy(), sin.numpy()), pos, cfg, rot.inv_freq.numpy())


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
