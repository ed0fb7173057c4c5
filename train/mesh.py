"""Device meshes for training.

SEAM — :func:`mesh_from_spec` is a local stand-in for ``gptoss_jax.sharding.mesh_from_spec`` (the
mesh issue); replace the call in :mod:`train.trainer` once that lands.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


class MeshError(ValueError):
    """A mesh spec is malformed or does not fit the devices."""


def mesh_from_spec(spec: str, devices=None) -> Mesh | None:
    """``"data=2,expert=4"`` -> a Mesh with those named axes (Auto axis types: the compiler propagates
    shardings); an empty spec -> None (one device)."""
    if not spec or not spec.strip():
        return None
    names, sizes = [], []
    for part in spec.split(","):
        name, eq, size = part.strip().partition("=")
        if not eq or not name or not size.strip().isdigit() or int(size) < 1 or name in names:
            raise MeshError(f"field 'mesh': bad axis {part.strip()!r} in {spec!r}; expected e.g. 'data=2,expert=4'")
        names.append(name.strip())
        sizes.append(int(size))
    devices = jax.devices() if devices is None else devices
    if math.prod(sizes) != len(devices):
        raise MeshError(f"field 'mesh': {spec!r} needs {math.prod(sizes)} devices, {len(devices)} available")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices)


def batch_sharding(mesh: Mesh | None, ndim: int, batch_axis: int) -> NamedSharding | None:
    """Shard dimension ``batch_axis`` of ``ndim``-d batch arrays over the mesh's ``data`` axis."""
    if mesh is None:
        return None
    spec = [None] * ndim
    if "data" in mesh.shape:
        spec[batch_axis] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))
