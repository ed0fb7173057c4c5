"""Writing our checkpoint folders (the format is described in :mod:`gptoss_jax.checkpoint.orbax`):
parameter groups saved with Orbax, the JSON marker written last, atomically (:mod:`convert.atomic`)."""
from __future__ import annotations

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.atomic import atomic_folder, disk_full_error
from convert.shards import write_json
from gptoss_jax.checkpoint.orbax import (CHUNK_BYTES, FORMAT, FORMAT_VERSION, MARKER, PARAMS, group_of, groups_of,
                                         is_expert_weight, nest, quiet_orbax)
from gptoss_jax.checkpoint.shapes import flat_paths, param_shapes
from gptoss_jax.config import GptOssConfig

log = logging.getLogger(__name__)


def write_marker(folder: str, cfg: GptOssConfig, experts: str, dtype: str,
                 params: dict[str, tuple[tuple[int, ...], str]], source: dict, files: list[str]) -> None:
    write_json(os.path.join(folder, MARKER), {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(), "experts": experts,
        "dtype": dtype, "source": source, "files": sorted(files),
        "params": {p: {"shape": list(s), "dtype": d, "group": group_of(p)} for p, (s, d) in params.items()},
    })


def _save_checkpointer():
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry, type_handlers

    registry = type_handler_registry.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.ArrayHandler()))
    with quiet_orbax():
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


class GroupWriter:
    """Writes parameter groups into ``folder/params``, each parameter exactly once; ``written`` records
    path -> (shape, dtype name)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(os.path.join(folder, PARAMS), exist_ok=True)
        self.written: dict[str, tuple[tuple[int, ...], str]] = {}
        self._checkpointer = _save_checkpointer()

    def save(self, group: str, arrays: dict[str, np.ndarray | jax.Array]) -> None:
        import orbax.checkpoint as ocp

        for path in arrays:
            if group_of(path) != group:
                raise AssertionError(f"parameter {path} does not belong to group {group}")
            if path in self.written:
                raise AssertionError(f"parameter {path} written twice")
        save_args = {p: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if is_expert_weight(p) else ())
                     for p in arrays}
        target = os.path.join(self.folder, PARAMS, group)
        try:
            with quiet_orbax():
                self._checkpointer.save(target, args=ocp.args.PyTreeSave(nest(arrays), save_args=nest(save_args)))
        except Exception as e:
            full = disk_full_error(e, target)
            if full is not None:
                raise full from e
            raise
        self.written.update({p: (tuple(a.shape), np.dtype(a.dtype).name) for p, a in arrays.items()})

    def close(self) -> None:
        self._checkpointer.close()


def copy_files(files: dict[str, str], folder: str) -> list[str]:
    """Copy {name in folder: source path}; names are plain file names other than ours."""
    for name, src in files.items():
        if os.path.basename(name) != name or name in (MARKER, PARAMS, "", ".", ".."):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than {MARKER!r}/{PARAMS!r}")
        if not os.path.isfile(src):
            raise FileNotFoundError(f"extra file {name!r}: {src} does not exist")
        shutil.copyfile(src, os.path.join(folder, name))
    return sorted(files)


def model_params(model) -> dict[str, nnx.Variable]:
    """A :class:`GptOss`'s parameters by dotted path, checked against the name table: a parameter the
    table does not know (e.g. a LoRA adapter not merged yet) or a wrong shape is an error."""
    params = flat_paths(nnx.state(model, nnx.Param))
    expected = param_shapes(model.config, model.expert_format)
    for name in [*expected, *params]:
        if name not in params or name not in expected:
            what = "lacks" if name not in params else "has an extra"
            raise ValueError(f"model {what} parameter '{name}' (merge adapters into the base first)")
        if tuple(params[name].shape) != expected[name]:
            hint = (" (packed experts in the TPU layout are saved in the checkpoint's: "
                    "gptoss_jax.layers.moe.set_expert_layout(model, 'checkpoint') first)"
                    if name.endswith(("_blocks", "_scales")) else "")
            raise ValueError(f"parameter '{name}' has shape {tuple(params[name].shape)}, expected {expected[name]}{hint}")
    return params


def save_checkpoint(model, dst: str | os.PathLike, *, extra_files: dict[str, str] | None = None,
                    overwrite: bool = False) -> str:
    """Write an in-memory :class:`GptOss` (e.g. after fine-tuning) as our format at ``dst``, atomically.

    extra_files: {file name in dst: path of the file to copy}, e.g.
      ``convert.carried_files(base_folder)`` to keep the tokenizer and generation config.
    Arrays may be sharded over a mesh of this process's devices. Returns ``dst``.
    """
    if jax.process_count() > 1:
        raise ValueError(f"save_checkpoint writes from a single JAX process (this job has {jax.process_count()}); "
                         f"gather the model in one process first")
    cfg, experts = model.config, model.expert_format
    params = {p: v[...] for p, v in model_params(model).items()}
    expected = param_shapes(cfg, experts)
    dst = os.path.abspath(os.fspath(dst))
    log.info("saving model (%s experts, %s) to %s", experts, jnp.dtype(model.dtype).name, dst)
    with atomic_folder(dst, overwrite) as tmp:
        writer = GroupWriter(tmp)
        try:
            for group, paths in groups_of(expected).items():
                writer.save(group, {p: params[p] for p in paths})
        finally:
            writer.close()
        files = copy_files(extra_files or {}, tmp)
        write_marker(tmp, cfg, experts, jnp.dtype(model.dtype).name, writer.written, {"kind": "model"}, files)
    log.info("saved %s", dst)
    return dst
