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
