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
#: Values per group of 8 word rows (one 32-bit sublane tile) of the TPU layout; K is padded to a multiple.
GROUP = 64
#: The TPU layout's scales have their blocks axis padded (with zero scales) to a multiple of this: u8 HBM
#: tiles hold 32 rows, and XLA:TPU lays out an axis that would be padded after a dim that is not (E), so
#: [E, 90, N] scales were stored E-minor-second and relaid out in every call.
SCALE_ROWS = 32


def scale_rows(g: int) -> int:
    """Rows of the TPU layout's scales for ``g`` blocks (g rounded up to :data:`SCALE_ROWS`)."""
    return -(-g // SCALE_ROWS) * SCALE_ROWS


def tpu_word_rows(k: int) -> int:
    """Word rows of the TPU layout for a contraction of ``k`` values (k padded to a multiple of :data:`GROUP`)."""
    return -(-k // GROUP) * GROUP // WORD


def to_tpu(blocks, scales, *, xp=jnp):
    """Checkpoint layout -> TPU layout: blocks u8 ``[..., N, G, 16]``, scales u8 ``[..., N, G]`` ->
    (words u32 ``[..., Kp/8, N]``, scales u8 ``[..., Gp, N]``; Kp = K rounded up to :data:`GROUP` (zero codes
    past K), Gp = :func:`scale_rows` (G); scale row ``h * Gp/2 + t`` holds block ``2t + h``, zero past G).

    Word rows come in groups of 8 (one 32-bit sublane tile): nibble j (bits ``4j .. 4j+3``) of word row
    ``8t + r`` holds value ``64t + 8j + r`` of column n. So decoding nibble j of a tile of words gives
    rows ``64t + 8j .. 64t + 8j + 7`` of the matrix: the 8 decoded planes stack into ``[K, N]`` in natural
    order by moving whole tiles, and the TPU kernel reads activations as they are (no strided planes).
    Word row ``8t + r`` takes block ``2t`` (nibbles 0-3) and ``2t + 1`` (4-7): the even blocks' scales come
    first, then the odd ones', so each half broadcasts to its word rows without a gather.
    The output dim N is minor in both arrays: TPU tiles the two minor dims of an array in HBM to
    (sublane, 128 lanes); N (a multiple of 128) fills the lanes and the contraction runs over the major
    dims. NumPy (``xp=np``) or JAX."""
    _check(blocks.shape, scales.shape)
    *lead, n, g, _ = blocks.shape
    k = g * BLOCK
    wp = tpu_word_rows(k)
    b = blocks.astype(xp.uint32)
    codes = xp.stack([b & 0xF, b >> 4], axis=-1).reshape(*lead, n, k)  # value 2i: the low nibble of byte i
    codes = xp.pad(codes, [(0, 0)] * (len(lead) + 1) + [(0, wp * WORD - k)])
    codes = codes.reshape(*lead, n, wp // WORD, WORD, WORD)  # [..., N, t, j, r]: value 64t + 8j + r
    words = codes[..., 0, :]
    for j in range(1, WORD):
        words = words | (codes[..., j, :] << (4 * j))
    words = words.reshape(*lead, n, wp).astype(xp.uint32)
    gp = scale_rows(g)
    sc = xp.pad(scales, [(0, 0)] * (scales.ndim - 1) + [(0, gp - g)]).reshape(*lead, n, gp // 2, 2)
    sc = xp.swapaxes(sc, -1, -2).reshape(*lead, n, gp)  # row h * Gp/2 + t: block 2t + h
    return xp.swapaxes(words, -1, -2), xp.swapaxes(sc, -1, -2)


def from_tpu(words, scales, *, k: int | None = None, xp=jnp):
    """TPU layout -> checkpoint layout (inverse of :func:`to_tpu`). ``k``: the contraction size, needed when
    it is not a multiple of :data:`GROUP` (default: the words' Kp)."""
    check_tpu(words.shape, scales.shape)
    *lead, wp, n = words.shape
    k = wp * WORD if k is None else k
    if k % BLOCK or tpu_word_rows(k) != wp:
        raise ValueError(f"MXFP4 TPU words {tuple(words.shape)}: {k} values do not fill {wp} word rows")
    w = xp.swapaxes(words, -1, -2).astype(xp.uint32).reshape(*lead, n, wp // WORD, WORD)  # [..., N, t, r]
    codes = xp.stack([(w >> (4 * j)) & 0xF for j in range(WORD)], axis=-2)  # [..., N, t, j, r]
    codes = codes.reshape(*lead, n, wp * WORD)[..., :k].reshape(*lead, n, k // 2, 2)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).astype(xp.uint8)
    g, gp = k // BLOCK, scales.shape[-2]
    sc = xp.swapaxes(scales, -1, -2).reshape(*lead, n, 2, gp // 2)
    sc = xp.swapaxes(sc, -1, -2).reshape(*lead, n, gp)[..., :g]
    return blocks.reshape(*lead, n, g, BYTES_PER_BLOCK), sc


def is_tpu(blocks) -> bool:
    """Whether packed expert weights are in the TPU layout (u32 words) rather than the checkpoint's (u8)."""
    return jnp.dtype(blocks.dtype) == jnp.uint32


def check_tpu(words_shape, scales_shape):
    if len(words_shape) < 2 or tuple(words_shape[:-2]) != tuple(scales_shape[:-2]) \
            or words_shape[-1] != scales_shape[-1] or words_shape[-2] % WORD \
            or scales_shape[-2] != scale_rows(words_shape[-2] // 4):
        raise ValueError(f"MXFP4 TPU words {tuple(words_shape)} and scales {tuple(scales_shape)} do not match "
                         f"(expected words [..., Kp/8, N] with Kp a multiple of {GROUP} and scales "
                         f"[..., K/32 rounded up to {SCALE_ROWS}, N])")


def dims(blocks_shape, scales_shape) -> tuple[int, int]:
    """(N, K) of the matrices packed in either layout (checked); for the TPU layout K is the padded Kp."""
    if len(blocks_shape) == len(scales_shape):
        check_tpu(blocks_shape, scales_shape)
        return words_shape_k(blocks_shape)
    _check(blocks_shape, scales_shape)
    return scales_shape[-2], scales_shape[-1] * BLOCK


def words_shape_k(words_shape) -> tuple[int, int]:
    """(N, Kp) of TPU-layout words [..., Kp/8, N]."""
    return words_shape[-1], words_shape[-2] * WORD


def fits_tpu(k: int, kp: int) -> bool:
    """Whether a contraction of ``k`` values is the one TPU words of ``kp`` (padded) values hold."""
    return k % BLOCK == 0 and tpu_word_rows(k) * WORD == kp


def _word_codes(words: jax.Array, j: int) -> jax.Array:
    return (words >> (4 * j)) & 0xF


def _block_scales(scales: jax.Array, t: int) -> jax.Array:
    """TPU-layout scales [..., Gp, N] -> float32 [..., t, 2, N]: the scales of blocks 2t' and 2t' + 1."""
    gh = scales.shape[-2] // 2
    sc = jnp.stack([scales[..., :t, :], scales[..., gh:gh + t, :]], axis=-2)
    return jax.lax.bitcast_convert_type(sc, jnp.float8_e8m0fnu).astype(jnp.float32)


def unpack_tpu(words: jax.Array, scales: jax.Array, dtype=jnp.bfloat16, k: int | None = None) -> jax.Array:
    """Decode the TPU layout: words ``[..., Kp/8, N]``, scales ``[..., Gp, N]`` -> ``[..., N, k]`` dtype
    (the same matrix :func:`unpack` gives for the checkpoint layout; ``k`` default Kp)."""
    check_tpu(words.shape, scales.shape)
    *lead, wp, n = words.shape
    t = wp // WORD
    w = words.reshape(*lead, t, 1, WORD, n)
    codes = jnp.concatenate([_word_codes(w, j) for j in range(WORD)], axis=-3)  # [..., t, j, r, N]
    scale = _block_scales(scales, t).reshape(*lead, t, 2, 1, 1, n)  # block 2t + (j >= 4)
    values = e2m1_values(codes).reshape(*lead, t, 2, WORD // 2, WORD, n) * scale
    out = jnp.swapaxes(values.reshape(*lead, wp * WORD, n), -1, -2)
    return out[..., :wp * WORD if k is None else k].astype(dtype)


def matvec_tpu(x: jax.Array, words: jax.Array, scales: jax.Array) -> jax.Array:
    """:func:`matvec` for the TPU layout: words [Kp/8, N], scales [Gp, N]; x [K] -> float32 [N].

    N stays the minor (lane) dim throughout: the codes are decoded and reduced over the major dims
    (word rows, then blocks), so XLA reads the words once, in their stored layout."""
    check_tpu(words.shape, scales.shape)
    wp, n = words.shape
    if not fits_tpu(x.shape[0], wp * WORD):
        raise ValueError(f"MXFP4 TPU matvec: x [{x.shape[0]}] does not match words {tuple(words.shape)}")
    t = wp // WORD
    xs = jnp.pad(x.astype(jnp.float32), (0, wp * WORD - x.shape[0])).reshape(t, 2, WORD // 2, WORD)  # [t, h, j', r]
    b = words.reshape(t, WORD, n)  # [t, r, N]
    terms = [sum(e2m1_values(_word_codes(b, 4 * h + j)) * xs[:, h, j, :, None] for j in range(WORD // 2))
             for h in range(2)]  # each [t, r, N]: the values of block 2t + h
    scale = _block_scales(scales, t)
    return jnp.sum(jnp.sum(terms[0], axis=1) * scale[:, 0] + jnp.sum(terms[1], axis=1) * scale[:, 1], axis=0)
