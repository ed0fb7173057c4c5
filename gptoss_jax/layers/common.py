"""Helpers shared by the layers: parameter declaration with logical axes, matmul precision."""
from __future__ import annotations

import math

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


def matmul(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec, x, w)`` with x's dtype operands and a float32 result.

    XLA:CPU upcasts a single-row (matrix-vector) bf16 dot to float32, converting the whole weight on
    every call (5x its bytes, ~20x slower); from two rows on it keeps bf16. So on CPU a one-row ``x``
    (decode at batch 1) gets a zero row appended along its first axis, which must be a batch axis
    that leads the output too (true for every spec in this package; no ``...`` in ``spec``).
    """
    w = w.astype(x.dtype)
    x_axes, out_axes = spec.split(",")[0], spec.split("->")[1]
    rows = math.prod(n for a, n in zip(x_axes, x.shape) if a in out_axes)
    pad = rows == 1 and x.dtype != jnp.float32 and jax.default_backend() == "cpu"
    if pad:
        x = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    y = jnp.einsum(spec, x, w, precision=precision_for(x.dtype), preferred_element_type=jnp.float32)
    return y[:1] if pad else y


def dense(x: jax.Array, w: jax.Array, spec: str, bias: jax.Array | None = None) -> jax.Array:
    """``einsum(spec, x, w) (+ bias)`` in x's dtype with float32 accumulation."""
    y = matmul(x, w, spec)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
