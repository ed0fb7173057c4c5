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
