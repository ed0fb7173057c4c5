"""MXFP4: decoding is bit-exact against transformers' own dequantization; the quantizer round-trips."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_jax import mxfp4


def _every_byte_and_scale(experts=3, rows=10):
    """Blocks covering all 256 byte values (all nibble pairs) and scales 2^-20 .. 2^20."""
    rng = np.random.default_rng(0)
    blocks = rng.permutation(np.tile(np.arange(256, dtype=np.uint8), experts * rows * 2 * 16 // 256 + 1))
    blocks = blocks[: experts * rows * 2 * 16].reshape(experts, rows, 2, 16)
    scales = rng.integers(127 - 20, 127 + 21, (experts, rows, 2)).astype(np.uint8)
    return blocks, scales


def _transformers_dequant(blocks, scales, dtype):
    # transformers returns [E, in, out] (it transposes for its x @ W experts); ours is [E, out, in]
    out = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
    return out.transpose(1, 2).float().numpy()


@pytest.mark.parametrize("tdtype, jdtype", [(torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16)])
def test_unpack_is_bit_exact_against_transformers(tdtype, jdtype):
    blocks, scales = _every_byte_and_scale()
    ref = _transformers_dequant(blocks, scales, tdtype)
    ours = np.asarray(jax.jit(mxfp4.unpack, static_argnums=2)(jnp.asarray(blocks), jnp.asarray(scales), jdtype))
    assert ours.dtype == np.dtype(jdtype) and ours.shape == ref.shape == (3, 10, 64)
    np.testing.assert_array_equal(ours.astype(np.float32).view(np.uint32), ref.view(np.uint32))  # incl. -0.0
    np.testing.assert_array_equal(mxfp4.unpack_np(blocks, scales).view(np.uint32), _transformers_dequant(
        blocks, scales, torch.float32).view(np.uint32))


def test_low_nibble_is_the_first_element():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x72  # low nibble 2 (1.0), high nibble 7 (6.0)
    out = mxfp4.unpack_np(blocks, np.array([127], np.uint8))
    assert out.shape == (32,) and out[0] == 1.0 and out[1] == 6.0 and not out[2:].any()


def test_quantize_reproduces_decoded_values_and_canonical_blocks():
    blocks, scales = _every_byte_and_scale()
    dense = mxfp4.unpack_np(blocks, scales)
    for xp in (np, jnp):
        qb, qs = mxfp4.quantize(dense, xp=xp)
        np.testing.assert_array_equal(mxfp4.unpack_np(np.asarray(qb), np.asarray(qs)), dense)
    # blocks whose largest magnitude is 4 or 6 have exactly one encoding: byte-identical
    amax = np.abs(dense.reshape(3, 10, 2, 32)).max(-1) / np.exp2(scales.astype(np.float64) - 127)
    canonical = amax >= 4
    qb, qs = mxfp4.quantize(dense, xp=np)
    assert canonical.mean() > 0.9
    np.testing.assert_array_equal(qb[canonical], blocks[canonical])
    np.testing.assert_array_equal(qs[canonical], scales[canonical])


def test_quantize_error_is_within_half_a_grid_step():
    w = np.random.default_rng(1).standard_normal((4, 8, 96)).astype(np.float32) * 3
    qb, qs = mxfp4.quantize(w, xp=np)
    deq = mxfp4.unpack_np(qb, qs)
    scale = np.exp2(qs.astype(np.float64) - 127)[..., None]  # [4, 8, 3, 1]
    scaled = (w.reshape(4, 8, 3, 32) / scale)
    assert np.abs(scaled).max() <= 6.0  # never saturates
    grid = np.array(sorted(set(np.abs(mxfp4.FP4_VALUES))))  # 0 .. 6
    step = np.diff(grid)[np.clip(np.searchsorted(grid, np.abs(scaled)) - 1, 0, len(grid) - 2)]
    err = np.abs(deq.reshape(4, 8, 3, 32) / scale - scaled)
    assert (err <= step / 2 + 1e-6).all()
    # the jitted JAX quantizer agrees with NumPy (and ml_dtypes' rounding) exactly
    jb, js = jax.jit(mxfp4.quantize)(w)
    np.testing.assert_array_equal(np.asarray(jb), qb)
    np.testing.assert_array_equal(np.asarray(js), qs)


def test_zero_blocks_and_shape_errors():
    qb, qs = mxfp4.quantize(np.zeros((2, 32), np.float32), xp=np)
    assert not qb.any() and not mxfp4.unpack_np(qb, qs).any()
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.packed_shape((4, 33))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.unpack_np(np.zeros((2, 3, 16), np.uint8), np.zeros((2, 2), np.uint8))


def test_packed_size_is_4_25_bits_per_value():
    assert mxfp4.packed_nbytes((32, 5760, 2880)) * 8 / (32 * 5760 * 2880) == 4.25
    assert ml_dtypes.float4_e2m1fn(6.0) == 6.0  # the dtype the decoder goes through


def test_tpu_layout_round_trips_and_decodes_to_the_same_matrix():
    """to_tpu / from_tpu (NumPy and JAX) are inverse and agree; the TPU layout decodes to the same matrix
    (every byte value, every scale), its padded scale rows are zero; matvec_tpu equals the dense product
    within float32 summation rounding. K = 64 fills one group of 8 word rows; K = 96 is padded to 128."""
    blocks, scales = _every_byte_and_scale()  # [3, 10, 2, 16]: N = 10, K = 64
    words, st = mxfp4.to_tpu(blocks, scales, xp=np)
    assert words.dtype == np.uint32 and words.shape == (3, 8, 10) and st.shape == (3, mxfp4.SCALE_ROWS, 10)
    half = mxfp4.SCALE_ROWS // 2  # even blocks in rows 0.., odd blocks from row 16
    np.testing.assert_array_equal(st[:, [0, half]], np.swapaxes(scales, -1, -2))
    assert np.all(np.delete(st, [0, half], axis=1) == 0)
    # nibble j of word row r (one group: t = 0) is value 8j + r
    codes = np.stack([blocks & 0xF, blocks >> 4], -1).reshape(3, 10, 64)
    np.testing.assert_array_equal((words[:, 3, :] >> 20) & 0xF, codes[:, :, 8 * 5 + 3])
    wj, sj = mxfp4.to_tpu(jnp.asarray(blocks), jnp.asarray(scales))
    np.testing.assert_array_equal(np.asarray(wj), words)
    np.testing.assert_array_equal(np.asarray(sj), st)
    for back in (mxfp4.from_tpu(words, st, xp=np), mxfp4.from_tpu(wj, sj)):
        np.testing.assert_array_equal(np.asarray(back[0]), blocks)
        np.testing.assert_array_equal(np.asarray(back[1]), scales)
    dense = mxfp4.unpack_np(blocks, scales)
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack_tpu(wj, sj, jnp.float32)), dense)
    assert mxfp4.is_tpu(wj) and not mxfp4.is_tpu(blocks)
    assert mxfp4.dims(wj.shape, sj.shape) == mxfp4.dims(blocks.shape, scales.shape) == (10, 64)
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    exact = dense[1].astype(np.float64) @ x
    bound = 65 * 2.0 ** -24 * (np.abs(dense[1]).astype(np.float64) @ np.abs(x))
    assert np.all(np.abs(np.asarray(mxfp4.matvec_tpu(jnp.asarray(x), wj[1], sj[1])) - exact) <= bound)
    with pytest.raises(ValueError, match="TPU words"):
        mxfp4.unpack_tpu(wj, sj[:, :1])

    b3 = np.concatenate([blocks, blocks[:, :, :1]], axis=2)  # K = 96: three blocks, padded to 128 values
    s3 = np.concatenate([scales, scales[:, :, :1] + 1], axis=2)
    w3, t3 = mxfp4.to_tpu(jnp.asarray(b3), jnp.asarray(s3))
    assert w3.shape == (3, 16, 10) and mxfp4.dims(w3.shape, t3.shape) == (10, 128) and mxfp4.fits_tpu(96, 128)
    dense3 = mxfp4.unpack_np(b3, s3)
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack_tpu(w3, t3, jnp.float32, 96)), dense3)
    np.testing.assert_array_equal(np.asarray(mxfp4.unpack_tpu(w3, t3, jnp.float32))[..., 96:], 0)
    back = mxfp4.from_tpu(w3, t3, k=96)
    np.testing.assert_array_equal(np.asarray(back[0]), b3)
    np.testing.assert_array_equal(np.asarray(back[1]), s3)
    x3 = np.random.default_rng(2).standard_normal(96).astype(np.float32)
    bound = 97 * 2.0 ** -24 * (np.abs(dense3[0]).astype(np.float64) @ np.abs(x3))
    assert np.all(np.abs(np.asarray(mxfp4.matvec_tpu(jnp.asarray(x3), w3[0], t3[0])) - dense3[0] @ x3) <= bound)
    with pytest.raises(ValueError, match="do not fill"):
        mxfp4.from_tpu(w3, t3, k=160)
