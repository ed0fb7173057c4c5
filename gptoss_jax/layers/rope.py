"""YaRN rotary position embedding, half-split (NeoX "rotate_half") layout.

Frequencies follow the reference: no rounding of the YaRN correction range, and the concentration
``0.1 ln(factor) + 1`` multiplies both cos and sin (so attention logits grow by its square).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import GptOssConfig, yarn_correction_range


def yarn_inv_freq(cfg: GptOssConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] float32, blending interpolation and extrapolation."""
    d = cfg.head_dim
    freq = np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    extrapolation = np.float32(1.0) / freq
    if cfg.rope_scaling_factor <= 1:
        return extrapolation.astype(np.float32)
    interpolation = np.float32(1.0) / (np.float32(cfg.rope_scaling_factor) * freq)
    low, high = yarn_correction_range(cfg)
    ramp = (np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    mask = np.float32(1.0) - np.clip(ramp, 0, 1)  # weight of extrapolation (1 for high frequencies)
    return (interpolation * (np.float32(1.0) - mask) + extrapolation * mask).astype(np.float32)


def rope_tables(positions: jax.Array, cfg: GptOssConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim/2] float32 for integer ``positions`` [...], times the concentration."""
    inv_freq = jnp.asarray(yarn_inv_freq(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    c = jnp.float32(cfg.concentration)
    return jnp.cos(angles) * c, jnp.sin(angles) * c


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + D/2). x [B, T, n, D]; cos/sin [B, T, D/2] (cast to x's dtype first)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
