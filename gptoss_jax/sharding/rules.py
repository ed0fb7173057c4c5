"""Logical axis -> mesh axis rules, and the named presets.

Parameters declare logical axes once (``gptoss_jax.layers.common.param``: vocab, embed, heads,
kv_heads, head_dim, experts, mlp); activations and KV caches add ``batch``. A rule table maps each
logical name to a mesh axis, a tuple of mesh axes (the dimension is split over their product, the
first named outermost) or None (replicated). Mesh axes are ``data``, ``expert`` and ``model``
(:mod:`gptoss_jax.sharding.mesh`). A mesh axis is skipped for a dimension when it is absent, has size
1, would not divide the dimension, or is already used by an earlier dimension of the same array, so
every preset is valid on every mesh (it only shards less where shapes do not divide).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Target = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, Target]]

#: Named rule tables. ``batch`` is the leading axis of activations and caches.
PRESETS: dict[str, tuple[tuple[str, Target], ...]] = {
    # everything replicated: one device, or the same computation on every device
    "single": (),
    # batch over data; parameters replicated
    "data": (("batch", "data"),),
    # experts split over `expert`, tokens over data x expert (attention is not repeated per expert shard)
    "expert": (("batch", ("data", "expert")), ("experts", "expert")),
    # as `expert`, plus attention heads and vocabulary over `model`; experts split over expert x model
    # (the model axis adds expert parallelism inside the MoE, as in vLLM's expert parallel over TP ranks)
    "expert_tensor": (("batch", ("data", "expert")), ("vocab", "model"), ("heads", "model"),
                      ("kv_heads", "model"), ("experts", ("expert", "model"))),
    # training: expert_tensor, and every parameter (hence its optimizer state) also split over data on its
    # first embed or mlp dimension (FSDP / ZeRO-3: gathered where used)
    "fsdp": (("batch", ("data", "expert")), ("vocab", "model"), ("embed", "data"), ("mlp", "data"),
             ("heads", "model"), ("kv_heads", "model"), ("experts", ("expert", "model"))),
}

#: The default: expert_tensor (data parallel, expert parallel and tensor-parallel attention, each where
#: the mesh has that axis).
DEFAULT_RULES: Rules = PRESETS["expert_tensor"]


def get_rules(rules: str | Rules | None = None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A preset name, a rule table or None (:data:`DEFAULT_RULES`) -> a normalized, hashable table."""
    if rules is None:
        rules = DEFAULT_RULES
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"unknown sharding rules {rules!r}; choose one of {sorted(PRESETS)}")
        rules = PRESETS[rules]
    table = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"a sharding rule is (logical axis, mesh axis or axes or None), got {entry!r}")
        name, target = entry
        table.append((name, () if target is None else (target,) if isinstance(target, str) else tuple(target)))
    return tuple(table)


def mesh_axes_for(name: str | None, dim: int, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                  used: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The mesh axes a dimension of size ``dim`` with logical ``name`` is split over (maybe none)."""
    targets = dict(get_rules(rules)).get(name, ()) if name is not None else ()
    chosen, product = [], 1
    for axis in targets:
        size = mesh.shape.get(axis, 1)
        if axis not in used and size > 1 and dim % (product * size) == 0:
            chosen.append(axis)
            product *= size
    return tuple(chosen)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes`` and ``shape`` on ``mesh``."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        chosen = mesh_axes_for(name, dim, mesh, rules, frozenset(used))
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:  # trailing Nones dropped, as jit writes its outputs' specs
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES, params=None):
    """Any pytree (abstract or concrete) -> same-structure pytree of NamedSharding.

    - ``nnx.Variable`` leaves (model state, ``nnx.Optimizer`` state, optax states of an ``nnx.State``)
      are sharded by their own logical axes (``out_sharding`` metadata);
    - with ``params`` (an nnx State carrying logical axes): every subtree of ``tree`` whose leaves have
      the shapes of the parameters, in order, gets the parameters' shardings, so optax states built
      from plain arrays (``mu``, ``nu`` of ``state.to_pure_dict()``) mirror their parameters;
    - every other leaf (step counts, RNG keys) is replicated.
    """
    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        axes = leaf.get_metadata().get("out_sharding") if _is_variable(leaf) else None
        return named_sharding(axes or (None,) * len(shape), shape, mesh, rules)

    if params is None:
        return jax.tree.map(one, tree, is_leaf=_is_variable)
    variables = jax.tree.leaves(params, is_leaf=_is_variable)
    shapes = [tuple(v.shape) for v in variables]

    def mirrors(sub) -> bool:
        leaves = jax.tree.leaves(sub, is_leaf=_is_variable)
        return len(leaves) == len(shapes) > 1 and [tuple(getattr(x, "shape", ())) for x in leaves] == shapes

    def place(sub):
        if mirrors(sub):
            return jax.tree.unflatten(jax.tree.structure(sub, is_leaf=_is_variable), map(one, variables))
        return one(sub)

    return jax.tree.map(place, tree, is_leaf=lambda s: _is_variable(s) or mirrors(s))


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """An nnx State (abstract or concrete) -> same-structure pytree of NamedSharding."""
    return tree_shardings(state, mesh, rules)


def bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) placed by ``shardings``."""
    def one(leaf, sharding):
        return math.prod(sharding.shard_shape(tuple(leaf.shape))) * jax.numpy.dtype(leaf.dtype).itemsize

    return sum(map(one, jax.tree.leaves(tree, is_leaf=_is_variable), jax.tree.leaves(shardings)))
