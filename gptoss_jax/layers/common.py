"""Helpers shared by the layers: parameter declaration with logical axes, matmul precision."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names used on parameters; gptoss_jax.sharding maps them to mesh axes by rules.
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "experts", "mlp")


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """An ``nnx.Param`` carrying its logical axis names (``out_sharding`` metadata), one per array axis.

    Sharding is declared here once; it is applied later by rules (never eagerly at creation).
    """
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for a {value.ndim}-d parameter {value.shape}")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def precision_for(dtype) -> jax.lax.Precision:
    """Full-precision matmuls when computing in float32 (parity); default passes otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def dense(x: jax.Array, w: jax.Array, spec: str, bias: jax.Array | None = None) -> jax.Array:
    """``einsum(spec, x, w) (+ bias)`` in x's dtype with float32 accumulation."""
    y = jnp.einsum(spec, x, w.astype(x.dtype), precision=precision_for(x.dtype),
                   preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
