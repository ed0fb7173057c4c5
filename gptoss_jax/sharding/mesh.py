"""Device meshes from a spec string, on one device, N devices or several hosts.

A spec names sizes of the three mesh axes, ``data``, ``expert`` and ``model`` (outermost to innermost:
``data`` may span hosts, ``model`` wants the fastest links): ``"data=2,expert=4"``; a missing axis has
size 1, and one axis may be ``-1`` (all remaining devices). The product must not exceed the device count;
a smaller product uses the first devices (single process only). Meshes use ``AxisType.Auto`` axes: the
model places arrays with ``NamedSharding`` and leaves propagation to the compiler, except inside the
expert-parallel ``shard_map``.

Several hosts: every process calls :func:`initialize_distributed` (``--coordinator HOST:PORT
--num-processes N --process-id I``, or ``--coordinator auto`` on TPU pods, SLURM and Open MPI, where
JAX finds them itself) before building the global mesh over ``jax.devices()`` (every process's devices).
"""
from __future__ import annotations

import argparse
import logging
import math
import os

import jax
from jax.sharding import AxisType, Mesh

from gptoss_jax.sharding.rules import PRESETS

log = logging.getLogger(__name__)

MESH_AXES = ("data", "expert", "model")


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4, "model": 1}`` (a ``-1`` size filled in)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE with AXIS one of {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size {value.strip()!r} of axis {name!r} is not an integer") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes are >= 1 (or -1 for the rest)")
        sizes[name] = size
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices do not split into {known} x {fill[0]}")
        sizes[fill[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ValueError(f"mesh spec {spec!r} needs {total} devices, only {num_devices} available")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def mesh_from_spec(spec: str | None, devices=None) -> Mesh:
    """A ``(data, expert, model)`` mesh. ``spec`` None or empty: every device on ``data``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec or "data=-1", len(devices))
    total = math.prod(sizes.values())
    if total < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh spec {spec!r} uses {total} of {len(devices)} devices; with several "
                             f"processes the mesh must cover every device")
        log.info("mesh %s uses %d of %d devices", spec, total, len(devices))
        devices = devices[:total]
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process JAX job (once per process, before any computation).

    ``coordinator`` ``"HOST:PORT"`` (process 0 listens there) with ``num_processes`` and ``process_id``,
    or ``"auto"`` for clusters JAX detects itself (CPU processes talk through gloo, JAX's default).
    """
    if coordinator is None:
        return
    check_process_arguments(coordinator, num_processes, process_id)
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def check_process_arguments(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """The multi-host arguments are complete and consistent (ValueError naming the argument otherwise)."""
    if coordinator is None or coordinator == "auto":
        return
    if num_processes is None or process_id is None:
        raise ValueError(f"--coordinator {coordinator} needs --num-processes and --process-id")
    if num_processes < 1:
        raise ValueError(f"--num-processes {num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is outside 0..{num_processes - 1}")


def check_mesh_arguments(args: argparse.Namespace) -> None:
    """Check the mesh arguments before anything loads: the multi-host ones, and on one process that
    ``--mesh`` parses and fits the local devices (ValueError otherwise). Several processes: the
    global device count is known only after joining, in :func:`mesh_from_args`."""
    check_process_arguments(args.coordinator, args.num_processes, args.process_id)
    if args.mesh is not None and args.coordinator is None:
        try:
            parse_mesh_spec(args.mesh, jax.device_count())
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def add_mesh_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--mesh``, ``--rules``, ``--coordinator``, ``--num-processes``, ``--process-id``."""
    g = parser.add_argument_group("devices and sharding")
    g.add_argument("--mesh", default=None, metavar="SPEC",
                   help="device mesh, e.g. 'expert=8' or 'data=2,expert=4' (axes data, expert, model; missing = 1, "
                        "one may be -1 = the rest); default: no mesh, one device")
    g.add_argument("--rules", default=None, choices=sorted(PRESETS),
                   help="how arrays are split over the mesh (default expert_tensor)")
    g.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
                   help="multi-host: address of process 0 ('auto' on TPU pods / SLURM / Open MPI); "
                        "env JAX_COORDINATOR_ADDRESS")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="multi-host: number of processes (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="multi-host: this process's index (env JAX_PROCESS_ID)")
    return parser


def mesh_from_args(args: argparse.Namespace) -> Mesh | None:
    """Join the distributed job if asked, then build ``--mesh`` (None without ``--mesh`` on one process).

    The rule table for the mesh is ``gptoss_jax.sharding.get_rules(args.rules)``.
    """
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.mesh is None and jax.process_count() == 1:
        return None
    return mesh_from_spec(args.mesh)
