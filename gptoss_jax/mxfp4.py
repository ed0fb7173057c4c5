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


# ------------------------------------------------------------------ the TPU layout (words, N minor)
#: Values per u32 word of the TPU layout.
WORD = 8
#: The TPU layout's scales have their blocks axis padded (with zero scales) to a multiple of this: u8 HBM
#: tiles hold 32 rows, and XLA:TPU lays out an axis that would be padded after a dim that is not (E), so
#: [E, 90, N] scales were stored E-minor-second and relaid out in every call.
SCALE_ROWS = 32


def scale_rows(g: int) -> int:
    """Rows of the TPU layout's scales for ``g`` blocks (g rounded up to :data:`SCALE_ROWS`)."""
    return -(-g // SCALE_ROWS) * SCALE_ROWS


def to_tpu(blocks, scales, *, xp=jnp):
    """Checkpoint layout -> TPU layout: blocks u8 ``[..., N, G, 16]``, scales u8 ``[..., N, G]`` ->
    (words u32 ``[..., G*4, N]``, scales u8 ``[..., Gp, N]``; Gp = :func:`scale_rows` (G), rows past G zero).

    Word w of column n holds values ``8w .. 8w+7`` of row n, value ``8w + j`` in bits ``4j .. 4j+3``
    (the checkpoint's bytes read little-endian). The output dim N is minor in both arrays: TPU tiles the
    two minor dims of an array in HBM to (sublane, 128 lanes), and the checkpoint's 16-byte / G-element
    minor dims are padded (x8 for the blocks) or relaid out by XLA in every call; here N (a multiple of
    128) fills the lanes and the contraction runs over the major dims. NumPy (``xp=np``) or JAX."""
    _check(blocks.shape, scales.shape)
    *lead, n, g, _ = blocks.shape
    if xp is np:
        words = np.ascontiguousarray(np.asarray(blocks, np.uint8)).reshape(*lead, n, g * 4, 4).view("<u4")[..., 0]
    else:
        words = jax.lax.bitcast_convert_type(blocks.reshape(*lead, n, g * 4, 4), jnp.uint32)
    pad = [(0, 0)] * (scales.ndim - 1) + [(0, scale_rows(g) - g)]
    return xp.swapaxes(words, -1, -2), xp.swapaxes(xp.pad(scales, pad), -1, -2)


def from_tpu(words, scales, *, xp=jnp):
    """TPU layout -> checkpoint layout (inverse of :func:`to_tpu`)."""
    check_tpu(words.shape, scales.shape)
    *lead, w, n = words.shape
    words = xp.swapaxes(words, -1, -2)  # [..., N, W]
    if xp is np:
        blocks = np.ascontiguousarray(np.asarray(words, np.uint32)).astype("<u4").view(np.uint8)
    else:
        blocks = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., N, W, 4], little-endian
    return blocks.reshape(*lead, n, w // 4, BYTES_PER_BLOCK), xp.swapaxes(scales[..., :w // 4, :], -1, -2)


def is_tpu(blocks) -> bool:
    """Whether packed expert weights are in the TPU layout (u32 words) rather than the checkpoint's (u8)."""
    return jnp.dtype(blocks.dtype) == jnp.uint32


def check_tpu(words_shape, scales_shape):
    if len(words_shape) < 2 or tuple(words_shape[:-2]) != tuple(scales_shape[:-2]) \
            or words_shape[-1] != scales_shape[-1] or words_shape[-2] % 4 \
            or scales_shape[-2] != scale_rows(words_shape[-2] // 4):
        raise ValueError(f"MXFP4 TPU words {tuple(words_shape)} and scales {tuple(scales_shape)} do not match "
                         f"(expected words [..., G*4, N] and scales [..., G rounded up to {SCALE_ROWS}, N])")


def dims(blocks_shape, scales_shape) -> tuple[int, int]:
    """(N, K) of the matrices packed in either layout (checked)."""
    if len(blocks_shape) == len(scales_shape):
        check_tpu(blocks_shape, scales_shape)
        return words_shape_k(blocks_shape)
    _check(blocks_shape, scales_shape)
    return scales_shape[-2], scales_shape[-1] * BLOCK


def words_shape_k(words_shape) -> tuple[int, int]:
    """(N, K) of TPU-layout words [..., K/8, N]."""
    return words_shape[-1], words_shape[-2] * WORD


def _word_codes(words: jax.Array, j: int) -> jax.Array:
    return (words >> (4 * j)) & 0xF


def unpack_tpu(words: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Decode the TPU layout: words ``[..., G*4, N]``, scales ``[..., Gp, N]`` -> ``[..., N, G*32]`` dtype
    (the same matrix :func:`unpack` gives for the checkpoint layout)."""
    check_tpu(words.shape, scales.shape)
    *lead, w, n = words.shape
    scales = scales[..., :w // 4, :]
    codes = jnp.stack([_word_codes(words, j) for j in range(WORD)], axis=-2)  # [..., W, 8, N]
    scale = jax.lax.bitcast_convert_type(scales, jnp.float8_e8m0fnu).astype(jnp.float32)  # [..., G, N]
    values = e2m1_values(codes).reshape(*lead, w // 4, 4 * WORD, n) * scale[..., None, :]
    return jnp.swapaxes(values.reshape(*lead, w * WORD, n), -1, -2).astype(dtype)


def matvec_tpu(x: jax.Array, words: jax.Array, scales: jax.Array) -> jax.Array:
    """:func:`matvec` for the TPU layout: words [G*4, N], scales [Gp, N]; x [K] -> float32 [N].

    N stays the minor (lane) dim throughout: the codes are decoded and reduced over the major dims
    (words, then blocks), so XLA reads the words once, in their stored layout."""
    check_tpu(words.shape, scales.shape)
    w, n = words.shape
    g = w // 4
    xs = x.astype(jnp.float32).reshape(g, 4, WORD)  # value 8w + j, word w = 4 * block + q
    b = words.reshape(g, 4, n)
    terms = sum(e2m1_values(_word_codes(b, j)) * xs[:, :, j, None] for j in range(WORD))  # [G, 4, N]
    scale = jax.lax.bitcast_convert_type(scales[:g], jnp.float8_e8m0fnu).astype(jnp.float32)
    return jnp.sum(jnp.sum(terms, axis=1) * scale, axis=0)
