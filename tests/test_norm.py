"""RMSNorm against transformers' GptOssRMSNorm on the reference model's own activations."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptoss_jax.layers.norm import rms_norm
from tests.reference import to_np


@pytest.mark.parametrize("name", ["model.layers.0.input_layernorm", "model.layers.2.post_attention_layernorm",
                                  "model.norm"])
def test_rms_norm_matches_reference_fp32(name, reference_run, hf_reference):
    _, _, records, _ = reference_run
    (x,), _, out = records[name]
    scale = dict(hf_reference.named_parameters())[f"{name}.weight"]
    ours = np.asarray(rms_norm(jnp.asarray(to_np(x)), jnp.asarray(to_np(scale)), 1e-5))
    np.testing.assert_allclose(ours, to_np(out), rtol=1e-6, atol=1e-6)


def test_rms_norm_bf16_rounds_once_like_reference():
    """bf16 in, float32 math with the float32 scale, one rounding to bf16 (bit-identical)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 7, 96)) * 30).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(96)).astype(np.float32)
    ref_mod = GptOssRMSNorm(96, eps=1e-5)
    ref_mod.weight.data = torch.from_numpy(w).bfloat16().float()  # checkpoint scale is bf16, upcast exactly
    with torch.no_grad():
        ref = ref_mod(torch.from_numpy(x).bfloat16()).float().numpy()
    ours = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), 1e-5)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), ref)
