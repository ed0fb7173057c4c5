"""MXFP4 (OCP microscaling FP4): E2M1 values with one E8M0 scale per block of 32.

Packed layout (as in the official checkpoints): ``blocks`` uint8 ``[..., G, 16]`` holds 32 E2M1
codes per block, element ``2j`` in the low nibble and ``2j+1`` in the high nibble of byte ``j``;
``scales`` uint8 ``[..., G]`` holds the E8M0 exponent (value ``2**(s - 127)``). Blocks run along the
last (input / contraction) axis, so ``[..., G, 16] -> [..., G*32]``.

Values are decoded through ml_dtypes' ``float4_e2m1fn`` and ``float8_e8m0fnu`` types, in JAX (inside
jitted expert computations, so weights stay packed in device memory) and in NumPy (host-side
conversion). Decoding is exact: every E2M1 value times a power of two is representable in bf16/f32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BLOCK = 32  # values per scale
BYTES_PER_BLOCK = 16

#: E2M1 value of each 4-bit code (bit 3 sign, bits 2-1 exponent, bit 0 mantissa).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0


def packed_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Dense ``[..., K]`` -> (blocks ``[..., K/32, 16]``, scales ``[..., K/32]``)."""
    *prefix, k = shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the last axis to be a multiple of {BLOCK}, got shape {tuple(shape)}")
    return (*prefix, k // BLOCK, BYTES_PER_BLOCK), (*prefix, k // BLOCK)


def _check(blocks_shape, scales_shape):
    if len(blocks_shape) < 2 or blocks_shape[-1] != BYTES_PER_BLOCK or tuple(blocks_shape[:-1]) != tuple(scales_shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks_shape)} and scales {tuple(scales_shape)} do not match "
                         f"(expected blocks [..., G, {BYTES_PER_BLOCK}] and scales [..., G])")


def unpack(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Decode packed MXFP4 in JAX. ``[..., G, 16]`` u8, ``[..., G]`` u8 -> ``[..., G*32]`` dtype."""
    _check(blocks.shape, scales.shape)
    # uint8 [..., G, 16] -> float4 [..., G, 16, 2]; the low nibble comes first.
    values = jax.lax.bitcast_convert_type(blocks, jnp.float4_e2m1fn).astype(jnp.float32)
    scale = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu).astype(jnp.float32)
    out = values.reshape(*blocks.shape[:-1], BLOCK) * scale[..., None]
    return out.reshape(*blocks.shape[:-2], -1).astype(dtype)


def e2m1_values(codes: jax.Array) -> jax.Array:
    """4-bit E2M1 codes (any integer dtype, values 0..15) -> float32, by building the float32 bits.

    Plain integer arithmetic, so XLA fuses it into whatever consumes the values (see :func:`matvec`).
    """
    c = codes.astype(jnp.int32)
    exponent, mantissa = (c >> 1) & 3, c & 1
    # e > 0: 2^(e-1) * (1 + m/2) -> float32 exponent e + 126, top mantissa bit m; e == 0: m * 0.5
    bits = jnp.where(exponent > 0, ((exponent + 126) << 23) | (mantissa << 22), mantissa * (126 << 23))
    return jax.lax.bitcast_convert_type(bits | ((c & 8) << 28), jnp.float32)


def matvec(x: jax.Array, blocks: jax.Array, scales: jax.Array) -> jax.Array:
    """``W @ x`` for one packed matrix W [N, K] (blocks [N, K/32, 16], scales [N, K/32]); x [K] -> float32 [N].

    The codes are decoded inside one multiply-reduce, which XLA fuses into a single pass over the packed
    bytes: W is read once at 4.25 bits per value and never materialised unpacked (the decode-time
    expert path). Products are exact in float32 and accumulate in float32.
    """
    _check(blocks.shape, scales.shape)
    n, g, _ = blocks.shape
    # Reduce over (g2 blocks x 32 values) first, then over the g1 groups: XLA rewrites one long
    # reduction into a tree that materialises the whole product.
    g2 = max(d for d in range(1, 17) if g % d == 0)
    xs = x.astype(jnp.float32).reshape(g // g2, g2, BYTES_PER_BLOCK, 2)  # value 2j: low nibble of byte j
    b = blocks.reshape(n, g // g2, g2, BYTES_PER_BLOCK)
    scale = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu).astype(jnp.float32).reshape(n, g // g2, g2)
    terms = e2m1_values(b & 0x0F) * xs[..., 0] + e2m1_values(b >> 4) * xs[..., 1]
    return jnp.sum(jnp.sum(terms * scale[..., None], axis=(-2, -1)), axis=-1)


def unpack_np(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Decode packed MXFP4 on the host with NumPy + ml_dtypes (same layout as :func:`unpack`)."""
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check(blocks.shape, scales.shape)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., G, 16, 2], low nibble first
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    scale = scales.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    out = values.reshape(*blocks.shape[:-1], BLOCK) * scale[..., None]
    return out.reshape(*blocks.shape[:-2], -1).astype(dtype)


def quantize(w, *, xp=jnp):
    """Dense ``[..., K]`` -> (blocks u8 ``[..., K/32, 16]``, scales u8 ``[..., K/32]``).

    Scale per block: the smallest power of two with ``amax / 2**e <= 6`` (no saturation); values round
    to nearest-even on the E2M1 grid. ``unpack(quantize(unpack(b, s)))`` equals ``unpack(b, s)``
    exactly. Works on NumPy (``xp=np``) and JAX (``xp=jnp``, jit-able) arrays.
    """
    blocks_shape, scales_shape = packed_shape(w.shape)
    x = xp.asarray(w).astype(xp.float32).reshape(*scales_shape, BLOCK)
    amax = xp.max(xp.abs(x), axis=-1)
    # exponent = ceil(log2(amax / 6)), computed exactly with frexp: amax/6 = m * 2**e, m in [0.5, 1).
    m, e = xp.frexp(amax / FP4_MAX)
    e = xp.where(m == 0.5, e - 1, e)  # exact power of two: ceil(log2) = e - 1
    e = xp.where(amax > 0, e, -127)
    e = xp.clip(e, -127, 127)
    scaled = x * xp.exp2(-e.astype(xp.float32))[..., None]
    if xp is np:
        codes = (scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0x0F).reshape(*scales_shape, BYTES_PER_BLOCK, 2)
        blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)
    else:  # bitcasting float4 [..., 16, 2] to uint8 packs each pair, low nibble first
        fp4 = scaled.astype(jnp.float4_e2m1fn).reshape(*scales_shape, BYTES_PER_BLOCK, 2)
        blocks = jax.lax.bitcast_convert_type(fp4, jnp.uint8)
    scales = (e + 127).astype(xp.uint8)
    return blocks.reshape(blocks_shape), scales


def packed_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of blocks + scales for a dense shape ``[..., K]`` (4.25 bits per value)."""
    b, s = packed_shape(shape)
    return int(np.prod(b)) + int(np.prod(s))
