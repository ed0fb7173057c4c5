"""RMSNorm: float32 math, float32 scale, one rounding to the activation dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.layers.common import param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``x * rsqrt(mean(x**2) + eps) * scale`` over the last axis. x [..., H], scale [H]."""
    t = x.astype(jnp.float32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + eps)
    return (t * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Holds ``scale`` [H] (logical axis ``embed``)."""

    def __init__(self, size: int, eps: float, *, dtype, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(jnp.ones((size,), dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
