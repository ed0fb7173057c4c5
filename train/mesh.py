"""Batch placement for training (meshes come from :func:`gptoss_jax.sharding.mesh_from_spec`)."""
from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec


def batch_sharding(mesh: Mesh | None, ndim: int, batch_axis: int) -> NamedSharding | None:
    """Shard dimension ``batch_axis`` of ``ndim``-d batch arrays over the mesh's ``data`` axis."""
    if mesh is None:
        return None
    spec = [None] * ndim
    if "data" in mesh.shape:
        spec[batch_axis] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))
