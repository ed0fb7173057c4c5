"""Our checkpoint folders: parameters as Orbax checkpoints written group by group, plus a JSON marker.

A folder ``DST`` holds::

    gptoss_jax.json       the marker, written last: format name and version, our GptOssConfig.to_dict(),
                          expert format, dtypes, every parameter (shape, dtype, group), the source
    params/embedding/     one Orbax PyTree checkpoint per group: embedding, layers.0 ... layers.{L-1},
    params/layers.0/      norm, unembedding. Inside, the tree is nested by our dotted parameter paths
    ...                   (Orbax names are exactly ``layers.0.mlp.gate_up_blocks`` etc.)
    tokenizer.json ...    tokenizer / generation files carried over from the source

Why groups: Orbax saves a pytree in one call with every leaf in host memory, so one checkpoint of the
whole model would hold the whole model. A group (one layer: 0.4 GB for 20b, 1.7 GB for 120b; or the
1.16 GB embedding) is saved at a time, so writing needs host memory for the largest group only.
Save options: no compression (weights, MXFP4 codes above all, barely compress, and the compressed copy
doubled peak memory), no defensive host copy (arrays are not mutated while saved), chunks of at most
16 MiB with one expert per chunk for expert tensors, so a process restoring onto a mesh reads only the
chunks that its devices' shards cover. MXFP4 experts stay packed (uint8 blocks and scales).
Measured peak RSS (BENCHMARKS.md): 1.28 GiB for 20b (the 2-D embedding is written without a copy);
3.5 GiB for 120b, whose layer group is 1.6 GiB and whose chunked 4-D expert tensors TensorStore
copies once while writing them.

Loading restores group by group with target shardings (Orbax ``ArrayRestoreArgs``): arrays land
sharded on the mesh without a full host copy; dtype casts happen in TensorStore and expert format
changes (packed <-> dense) on device. Writing is :mod:`convert.orbax_format`; reading is here.

Format versions: 2 stores each layer's attention input projection fused (``attn.qkv_kernel``,
``attn.qkv_bias``, :mod:`gptoss_jax.layers.qkv`); 1 stored ``attn.{q,k,v}_{kernel,bias}`` separately.
Version-1 folders still load: their q/k/v are read to the host and fused there (:func:`fuse_legacy`),
the other parameters restore as usual; ``gptoss-jax convert`` of the original source rewrites them.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.names import PACKED_PARTS
from gptoss_jax.checkpoint.shapes import EXPERT_FORMATS, param_shapes
from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.layers.qkv import fuse_qkv

MARKER = "gptoss_jax.json"
FORMAT = "gptoss-jax"
FORMAT_VERSION = 2
#: format_version 1 -> 2: the fused parameter <- its three separate ones (leaf names under ``layers.N.attn``)
LEGACY_QKV = {"qkv_kernel": ("q_kernel", "k_kernel", "v_kernel"), "qkv_bias": ("q_bias", "k_bias", "v_bias")}
_LEGACY_LEAF = {old: new for new, olds in LEGACY_QKV.items() for old in olds}
PARAMS = "params"
CHUNK_BYTES = 16 * 2**20


# ----------------------------------------------------------------------------------------- layout
def group_of(path: str) -> str:
    """Parameter path -> its group: ``layers.N`` for layer parameters, else the top-level name."""
    head, _, rest = path.partition(".")
    return f"{head}.{rest.split('.')[0]}" if head == "layers" else head


def groups_of(paths) -> dict[str, list[str]]:
    """Paths (in order) -> {group: [paths]}, groups in first-seen order."""
    out: dict[str, list[str]] = {}
    for p in paths:
        out.setdefault(group_of(p), []).append(p)
    return out


def nest(flat: dict) -> dict:
    """{'a.b.c': v} -> {'a': {'b': {'c': v}}}."""
    tree: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """Inverse of :func:`nest`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_expert_weight(path: str) -> bool:
    """``layers.N.mlp.{gate_up,down}_{blocks,scales,kernel}`` (not their biases, not the router)."""
    proj, _, part = path.rpartition(".")[2].rpartition("_")
    return proj in ("gate_up", "down") and part in ("blocks", "scales", "kernel")


def stored_shapes(cfg: GptOssConfig, experts: str, version: int = FORMAT_VERSION) -> dict[str, tuple[int, ...]]:
    """Every parameter a folder of format ``version`` stores, {path: shape} in model order (version 1:
    each fused q/k/v parameter as its three separate ones)."""
    shapes = param_shapes(cfg, experts)
    if version >= 2:
        return shapes
    out = {}
    for path, shape in shapes.items():
        head, _, leaf = path.rpartition(".")
        if leaf not in LEGACY_QKV:
            out[path] = shape
            continue
        nkv, slots, d = shape[-3:]
        lead = shape[:-3]
        for name, n in zip(LEGACY_QKV[leaf], (nkv * (slots - 2), nkv, nkv)):
            out[f"{head}.{name}"] = (*lead, n, d)
    return out


def model_path(path: str) -> str:
    """A stored parameter path -> the model parameter it becomes (a version-1 q/k/v part -> its fused path)."""
    head, _, leaf = path.rpartition(".")
    return f"{head}.{_LEGACY_LEAF[leaf]}" if leaf in _LEGACY_LEAF else path


def fuse_legacy(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{stored path: array} of a group -> {model path: array}: version-1 q/k/v parts fused (exact copies)."""
    out = {}
    for path, a in arrays.items():
        head, _, leaf = path.rpartition(".")
        if leaf not in _LEGACY_LEAF:
            out[path] = a
        elif leaf == LEGACY_QKV[_LEGACY_LEAF[leaf]][0]:
            out[model_path(path)] = fuse_qkv(*(arrays[f"{head}.{name}"] for name in LEGACY_QKV[_LEGACY_LEAF[leaf]]))
    return out


def is_converted(path: str | os.PathLike) -> bool:
    """True for a folder written by this module, complete (marker) or not (``params/`` only)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, MARKER)) or os.path.isdir(os.path.join(path, PARAMS))


# ----------------------------------------------------------------------------------------- marker
@dataclasses.dataclass(frozen=True)
class Marker:
    """What ``gptoss_jax.json`` says about a folder (validated against the config)."""

    folder: str
    config: GptOssConfig
    experts: str  # 'mxfp4' (packed) | 'dense'
    dtype: str  # dense weights other than experts
    params: dict[str, tuple[tuple[int, ...], str]]  # stored path -> (shape, dtype name)
    source: dict
    files: tuple[str, ...]
    version: int = FORMAT_VERSION  # 1: q/k/v stored separately (fused when read)

    @property
    def groups(self) -> dict[str, list[str]]:
        return groups_of(self.params)


def read_marker(path: str | os.PathLike) -> Marker:
    """Read and check a folder's marker; errors name the folder and what is wrong or missing."""
    folder = os.path.abspath(os.fspath(path))
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        if os.path.isdir(os.path.join(folder, PARAMS)):
            raise CheckpointError(f"{folder}: incomplete gptoss-jax checkpoint (no {MARKER}; its writing did not "
                                  f"finish). Convert again.")
        raise CheckpointError(f"{folder}: not a gptoss-jax checkpoint (no {MARKER}); convert an official folder "
                              f"with `gptoss-jax convert SRC DST` first")
    try:
        with open(marker) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{marker}: field 'format' is {d.get('format') if isinstance(d, dict) else d!r}, "
                              f"expected {FORMAT!r}")
    version = d.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{marker}: format_version {version!r}; this gptoss-jax reads versions 1..{FORMAT_VERSION}")
    try:
        cfg = GptOssConfig.from_dict(d["config"], f"{marker} config")
        experts, dtype, table = d["experts"], d["dtype"], d["params"]
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except KeyError as e:
        raise CheckpointError(f"{marker}: missing field {e}") from None
    if experts not in EXPERT_FORMATS:
        raise CheckpointError(f"{marker}: field 'experts' is {experts!r}, expected one of {EXPERT_FORMATS}")
    expected = stored_shapes(cfg, experts, version)
    for name in [*expected, *table]:
        if name not in table:
            raise CheckpointError(f"{marker}: parameter '{name}' is missing")
        if name not in expected:
            raise CheckpointError(f"{marker}: unexpected parameter '{name}' for this config")
        if tuple(table[name]["shape"]) != expected[name]:
            raise CheckpointError(f"{marker}: parameter '{name}' has shape {table[name]['shape']}, expected "
                                  f"{list(expected[name])} from its config")
    params = {p: (tuple(table[p]["shape"]), table[p]["dtype"]) for p in expected}
    for group in groups_of(params):
        if not os.path.isdir(os.path.join(folder, PARAMS, group)):
            raise CheckpointError(f"{folder}: missing parameter group folder {PARAMS}/{group}")
    return Marker(folder, cfg, experts, dtype, params, d.get("source", {}), tuple(d.get("files", ())), version)


# ----------------------------------------------------------------------------------------- orbax
@contextlib.contextmanager
def quiet_orbax():
    """Orbax logs every save and restore through absl at INFO; keep our logs one line per stage."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def release_memory() -> None:
    """Hand freed heap memory back to the OS between groups (glibc's ``malloc_trim``; a no-op elsewhere).

    TensorStore's threads and NumPy temporaries below glibc's mmap threshold leave freed memory in
    malloc arenas; without trimming, RSS crept from 1.3 to 1.8 GiB over the 24 layers of 20b."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------- reading
def restore_group(marker: Marker, group: str, restore_args: dict) -> dict[str, np.ndarray | jax.Array]:
    """Restore one group as {path: array}; ``restore_args`` maps each of its paths to Orbax restore args."""
    import orbax.checkpoint as ocp

    path = os.path.join(marker.folder, PARAMS, group)
    with quiet_orbax(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        try:
            stored = flatten(checkpointer.metadata(path).item_metadata.tree)
        except Exception as e:  # missing or damaged Orbax metadata
            raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from None
        for name in [*restore_args, *stored]:
            if name not in stored or name not in restore_args:
                raise CheckpointError(f"{path}: {'lacks' if name not in stored else 'has unexpected'} parameter '{name}'")
            shape, dtype = marker.params[name]
            if tuple(stored[name].shape) != shape or np.dtype(stored[name].dtype).name != dtype:
                raise CheckpointError(f"{path}: parameter '{name}' is {np.dtype(stored[name].dtype).name}"
                                      f"{list(stored[name].shape)}, the marker says {dtype}{list(shape)}")
        try:
            tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=nest(restore_args)))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read parameters ({type(e).__name__}: {e})") from None
    return flatten(tree)


def read_group(marker: Marker, group: str) -> dict[str, np.ndarray]:
    """One group as host NumPy arrays in their stored dtypes (export, inspection), by model path
    (a version-1 folder's q/k/v fused)."""
    import orbax.checkpoint as ocp

    return fuse_legacy(restore_group(marker, group, {p: ocp.RestoreArgs(restore_type=np.ndarray)
                                                     for p in marker.groups[group]}))


def restore_values(marker: Marker, targets: dict, shardings: dict) -> dict[str, np.ndarray | jax.Array]:
    """Every stored parameter, {path: array} cast to ``targets[path].dtype``.

    With shardings (a mesh), each parameter is restored straight into its sharding and each process
    reads only the chunks its devices hold; without (all None), one group at a time goes through host
    memory to the default device (uncommitted, as the official loader places them)."""
    import orbax.checkpoint as ocp

    values = {}
    for group, paths in marker.groups.items():
        if all(shardings[model_path(p)] is None for p in paths):
            values.update({p: jax.device_put(a.astype(targets[p].dtype, copy=False))
                           for p, a in read_group(marker, group).items()})
            release_memory()
            continue
        # version-1 q/k/v parts: read to the host, fused, then placed (each process builds its shards)
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray) if model_path(p) != p else
                ocp.ArrayRestoreArgs(sharding=shardings[p], dtype=targets[p].dtype, global_shape=targets[p].shape)
                for p in paths}
        for p, a in fuse_legacy(restore_group(marker, group, args)).items():
            if isinstance(a, np.ndarray):
                a = a.astype(targets[p].dtype, copy=False)
                a = jax.make_array_from_callback(a.shape, shardings[p], lambda index, a=a: a[index])
            values[p] = a
    return values


def convert_experts(values: dict, stored: str, shardings: dict, targets: dict) -> dict:
    """Packed <-> dense expert weights on device, into the target shardings."""
    out = {p: v for p, v in values.items() if not is_expert_weight(p)}
    bases = sorted({p.rsplit("_", 1)[0] for p in values if is_expert_weight(p)})
    for base in bases:
        if stored == "mxfp4":  # -> dense kernel [E, in, out]
            kernel = base + "_kernel"
            fn = _dequantize_fn(shardings[kernel], jnp.dtype(targets[kernel].dtype))
            out[kernel] = fn(values[base + "_blocks"], values[base + "_scales"])
        else:  # dense -> packed
            names = [f"{base}_{part}" for part in PACKED_PARTS]
            fn = _quantize_fn(tuple(shardings[n] for n in names))
            out.update(zip(names, fn(values[base + "_kernel"])))
    return out


@functools.lru_cache(maxsize=None)
def _dequantize_fn(sharding, dtype):
    return jax.jit(lambda blocks, scales: jnp.swapaxes(mxfp4.unpack(blocks, scales, dtype), 1, 2),
                   out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _quantize_fn(shardings):
    return jax.jit(lambda kernel: mxfp4.quantize(jnp.swapaxes(kernel, 1, 2), xp=jnp), out_shardings=shardings)
