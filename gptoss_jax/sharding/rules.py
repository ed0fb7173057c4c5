"""Logical axis -> mesh axis rules.

Parameters declare logical axes once (``gptoss_jax.layers.common.param``: vocab, embed, heads,
kv_heads, head_dim, experts, mlp). A rule table maps each logical name to a mesh axis (or None =
replicated). A mapping is skipped when the mesh axis is absent, has size 1, does not divide the
dimension, or is already used by an earlier dimension of the same array.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]

#: expert parallel over ``expert``, tensor parallel (heads, mlp, vocab) over ``model``.
DEFAULT_RULES: Rules = (
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("experts", "expert"),
    ("mlp", "model"),
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes`` and ``shape`` on ``mesh``."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        size = mesh.shape.get(target, 1) if target else 1
        if target and target not in used and size > 1 and dim % size == 0:
            spec.append(target)
            used.add(target)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """An nnx State (abstract or concrete) -> same-structure pytree of NamedSharding."""

    def one(var):
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
