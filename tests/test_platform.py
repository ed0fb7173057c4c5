"""gptoss_jax.platform: the platform comes from where the data lives, or from the program's lowering."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax import platform


def test_of_reads_the_placement_of_arrays_structs_shardings_and_meshes():
    cpu = jax.devices("cpu")[0]
    placed = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(cpu))
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("x",))
    assert platform.of({"a": jnp.zeros(2), "b": [placed]}) == "cpu"
    assert platform.of(mesh) == "cpu"
    assert platform.of(cpu) == "cpu"


def test_of_without_placement_needs_a_default():
    bare = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(ValueError, match="cannot tell the platform"):
        platform.of(bare)
    assert platform.of(bare, default="cuda") == "gpu"
    with pytest.raises(ValueError, match="unknown platform"):
        platform.normalize("metal")


def test_dependent_is_static_inside_lowering_for_and_xla_chosen_otherwise():
    def f(x):
        return platform.dependent(x, cpu=lambda x: x + 1, default=lambda x: x - 1)

    assert float(jax.jit(f)(jnp.float32(0))) == 1.0  # lowered for this CPU: the cpu branch

    def g(x):
        with platform.lowering_for("gpu"):
            return f(x)

    assert float(jax.jit(g)(jnp.float32(0))) == -1.0  # the entry point said gpu: the default branch
    assert platform.current() is None


def _integer_valued(shape, seed, dtype=jnp.float32):
    """Small integers as floats: every product and sum below is exact, in any order."""
    return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape), dtype)


def test_matmul_pads_one_row_dots_of_mid_size_weights_for_gpu():
    """XLA:GPU strength-reduces a one-row dot with a small weight into multiply + reduce and writes every
    float32 product; in a program for the GPU, matmul gives such dots a zero row (same values)."""
    from gptoss_jax.layers.common import GPU_PAD_MIN, GPU_SMALL_DOT, matmul

    x = _integer_valued((1, 1, 1024), 0)
    mid = _integer_valued((1024, 16, 64), 1)  # 2^20 elements: padded
    small = _integer_valued((1024, 8, 8), 2)  # below GPU_PAD_MIN: not padded
    assert GPU_PAD_MIN <= mid.size < GPU_SMALL_DOT and small.size < GPU_PAD_MIN
    want = jnp.einsum("bth,hkd->btkd", x, mid, precision="highest")

    def run(w, target):
        def f(x, w):
            with platform.lowering_for(target):
                return matmul(x, w, "bth,hkd->btkd")
        return str(jax.make_jaxpr(f)(x, w)), jax.jit(f)(x, w)

    jaxpr, got = run(mid, "gpu")
    assert "concatenate" in jaxpr
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert "concatenate" not in run(small, "gpu")[0]
    assert "concatenate" not in run(mid, "tpu")[0]
    assert "concatenate" not in run(mid, "cpu")[0]  # float32 x: no CPU padding either
