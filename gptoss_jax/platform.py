"""Which platform (``'cpu'``, ``'gpu'``, ``'tpu'``) a program is compiled for, from where its data lives.

Never ``jax.default_backend()``: a process may compile for a device that is not its default backend
(deviceless AOT for an H100 or a TPU from a CPU process, a CPU mesh beside a GPU), and a path picked
by the default backend is then the wrong one.

- :func:`of`: outside a trace, the platform of the devices an array / ``ShapeDtypeStruct`` / sharding /
  mesh / pytree of them is placed on (all must agree);
- :func:`lowering_for` / :func:`current`: an entry point that knows the platform (the decode runner
  passes it as a static argument, so each platform gets its own trace) sets it while tracing, and
  layers read it to pick a path in Python (a Pallas kernel, a block size);
- :func:`dependent`: a choice made by XLA when the program is lowered for its platform
  (``jax.lax.platform_dependent``), right wherever the trace came from; use it where no entry point
  sets :func:`current`.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("gptoss_platform", default=None)


def normalize(name: str) -> str:
    """A device / backend platform name -> one of :data:`PLATFORMS` ('cuda', 'rocm' -> 'gpu')."""
    name = name.lower()
    if name in ("cuda", "rocm", "gpu"):
        return "gpu"
    if name in PLATFORMS:
        return name
    raise ValueError(f"unknown platform {name!r}; expected one of {PLATFORMS} (or cuda/rocm)")


def _devices(x) -> set:
    if isinstance(x, jax.Device):
        return {x}
    if isinstance(x, jax.sharding.Mesh):
        return set(x.devices.flat)
    if isinstance(x, jax.sharding.Sharding):
        return set(x.device_set)
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding) and not isinstance(x, jax.core.Tracer):
        return set(sharding.device_set)
    return set()


def of(*trees: Any, default: str | None = None) -> str:
    """The platform the arrays (or ShapeDtypeStructs with a sharding, shardings, meshes, devices) in
    ``trees`` are placed on. ``default`` when none of them is placed (e.g. bare ShapeDtypeStructs);
    without a default that is an error, as is data on two platforms."""
    platforms = set()
    for tree in trees:
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, (jax.sharding.Mesh, jax.sharding.Sharding,
                                                                           jax.Device)))
        for leaf in leaves:
            platforms |= {normalize(d.platform) for d in _devices(leaf)}
    if len(platforms) > 1:
        raise ValueError(f"data is placed on devices of several platforms {sorted(platforms)}")
    if platforms:
        return platforms.pop()
    if default is None:
        raise ValueError("none of the arrays is placed on a device: cannot tell the platform (pass default=)")
    return normalize(default)


@contextlib.contextmanager
def lowering_for(platform: str):
    """While tracing a program for ``platform``: :func:`current` returns it."""
    token = _current.set(normalize(platform))
    try:
        yield
    finally:
        _current.reset(token)


def current() -> str | None:
    """The platform set by :func:`lowering_for` around the trace in progress, or None."""
    return _current.get()


def dependent(*args, cpu: Callable | None = None, gpu: Callable | None = None, tpu: Callable | None = None,
              default: Callable):
    """``branch(*args)`` for the platform the program is compiled for: static when :func:`current` is
    set, else chosen by XLA at lowering (``jax.lax.platform_dependent``; every branch is traced)."""
    branches = {"cpu": cpu, "gpu": gpu, "tpu": tpu}
    p = current()
    if p is not None:
        return (branches[p] or default)(*args)
    given = {k: v for k, v in branches.items() if v is not None}
    if "gpu" in given:
        given["cuda"] = given["rocm"] = given.pop("gpu")
    return jax.lax.platform_dependent(*args, default=default, **given)
