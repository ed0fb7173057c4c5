"""Helpers shared by the layers: parameter declaration with logical axes, matmul precision."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import platform

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


#: XLA:GPU strength-reduces a one-row dot into multiply + reduce below this many weight elements
#: (``IsMatrixMultiplicationTooSmallForRewriting``'s threshold in its algebraic simplifier).
GPU_SMALL_DOT = 10_000_000
#: ... and :func:`matmul` pads such dots to two rows from this many weight elements on.
GPU_PAD_MIN = 1 << 20


def matmul(x: jax.Array, w: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec, x, w)`` with x's dtype operands and a float32 result.

    XLA:CPU upcasts a single-row (matrix-vector) bf16 dot to float32, converting the whole weight on
    every call (5x its bytes, ~20x slower); from two rows on it keeps bf16. So in a program compiled
    for the CPU (:func:`gptoss_jax.platform.dependent`) a one-row ``x`` (decode at batch 1) gets a zero
    row appended along its first axis, which must be a batch axis that leads the output too (true for
    every spec in this package; no ``...`` in ``spec``).

    XLA:GPU rewrites a one-row dot with a small weight (under :data:`GPU_SMALL_DOT` elements) into a
    multiply and a reduce, and then emits the multiply as its own kernel writing every float32
    product (the k and v projections at batch 1: 4x the weight's bytes); two rows keep it a GEMM that
    reads the weight once. So in a program compiled for the GPU a one-row ``x`` gets the same zero
    row when the weight has :data:`GPU_PAD_MIN` to :data:`GPU_SMALL_DOT` elements (smaller weights:
    the extra launches cost more than the products).
    """
    w = w.astype(x.dtype)
    x_axes, out_axes = spec.split(",")[0], spec.split("->")[1]
    rows = math.prod(n for a, n in zip(x_axes, x.shape) if a in out_axes)

    def product(x, w):
        return jnp.einsum(spec, x, w, precision=precision_for(x.dtype), preferred_element_type=jnp.float32)

    def padded(x, w):
        return product(jnp.concatenate([x, jnp.zeros_like(x)], axis=0), w)[:1]

    if rows == 1:
        cpu = padded if x.dtype != jnp.float32 else None
        gpu = padded if GPU_PAD_MIN <= w.size < GPU_SMALL_DOT else None
        if cpu is not None or gpu is not None:
            return platform.dependent(x, w, cpu=cpu, gpu=gpu, default=product)
    return product(x, w)


def dense(x: jax.Array, w: jax.Array, spec: str, bias: jax.Array | None = None,
          delta: jax.Array | None = None) -> jax.Array:
    """``einsum(spec, x, w) (+ delta) (+ bias)`` in x's dtype with float32 accumulation.

    ``delta``: a float32 term added before rounding (a LoRA update, see :func:`lora_delta`).
    """
    y = matmul(x, w, spec)
    if delta is not None:
        y = y + delta
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def dropout(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout (identity when ``key`` is None or ``rate`` is 0)."""
    if key is None or not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, spec_a: str, spec_b: str,
               dropout_key: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
    """LoRA update ``(dropout(x) A) B`` as float32 (``b`` carries the alpha/rank scale).

    ``spec_a`` contracts x with A ``[in..., r]``, ``spec_b`` the rank-r result with B ``[r, out...]``.
    """
    prec = precision_for(x.dtype)
    h = jnp.einsum(spec_a, dropout(x, dropout_key, rate), a.astype(x.dtype), precision=prec,
                   preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum(spec_b, h, b.astype(x.dtype), precision=prec, preferred_element_type=jnp.float32)
