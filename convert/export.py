"""Our folder (or an in-memory :class:`GptOss`) -> the official transformers layout.

Written through the name table (:func:`gptoss_jax.checkpoint.names.export_items`, the inverse transforms of
loading): MXFP4 experts as the checkpoint's own uint8 blocks/scales (dense experts are re-quantized
with :func:`gptoss_jax.mxfp4.quantize`), the other weights in bf16 (the official dtype; configurable),
0-based shards ``model-0000k-of-0000N.safetensors`` of at most ``max_shard_bytes`` (4.8 GB, as
published), ``model.safetensors.index.json`` with ``metadata.total_size``, ``config.json``
(``GptOssConfig.to_hf_dict``), and the tokenizer/generation files carried in the folder. One
parameter group (or one model parameter) is in host memory at a time; the output folder appears
atomically. transformers, vLLM and the other official-layout readers load the result; a folder
converted from an official checkpoint exports to byte-identical tensors.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from convert.atomic import atomic_folder
from convert.orbax_format import copy_files, model_params
from convert.progress import Progress, human_bytes
from convert.shards import MAX_SHARD_BYTES, write_json, write_shards
from gptoss_jax.checkpoint.names import TRANSFORMERS, export_items, layout_tensors
from gptoss_jax.checkpoint.orbax import MARKER, group_of, read_group, read_marker, release_memory
from gptoss_jax.checkpoint.safetensors_file import DTYPES, dtype_name
from gptoss_jax.model import GptOss

log = logging.getLogger("convert")


class _FolderParams:
    """Parameters of our folder, read one group at a time (the previous group is dropped)."""

    def __init__(self, path):
        self.marker = read_marker(path)
        self.config, self.experts = self.marker.config, self.marker.experts
        self.files = {n: os.path.join(self.marker.folder, n) for n in self.marker.files}
        self.name = self.marker.folder
        self._group, self._arrays = None, {}

    def get(self, path: str) -> np.ndarray:
        if group_of(path) != self._group:
            self._arrays = {}  # drop before reading the next group
            release_memory()
            self._group, self._arrays = group_of(path), read_group(self.marker, group_of(path))
        return self._arrays[path]


class _ModelParams:
    """Parameters of an in-memory model, copied to the host one at a time."""

    def __init__(self, model):
        self.config, self.experts = model.config, model.expert_format
        self.files: dict[str, str] = {}
        self.name = "model"
        self._vars = model_params(model)
        self._last: tuple[str, np.ndarray] | None = None

    def get(self, path: str) -> np.ndarray:
        if self._last is None or self._last[0] != path:  # same object twice: both packed rows of a dense kernel
            value = self._vars[path][...]
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                raise ValueError(f"parameter '{path}' spans several processes; export runs in a single process")
            self._last = None
            self._last = (path, np.asarray(jax.device_get(value)))
        return self._last[1]


def export_official(src, out: str | os.PathLike, *, progress=None, dtype="bfloat16",
                    max_shard_bytes: int = MAX_SHARD_BYTES, extra_files: dict[str, str] | None = None,
                    overwrite: bool = False) -> str:
    """Write ``src`` (our converted folder, or a :class:`GptOss`) at ``out`` in the transformers layout.

    dtype: dtype of the non-expert weights (default bfloat16, as published).
    max_shard_bytes: largest shard (a bigger single tensor gets a shard of its own).
    extra_files: {name: path} copied into ``out`` besides the folder's own tokenizer/generation files.
    progress: None (bar on a terminal), True, False, or a callable(nbytes) per tensor. Returns ``out``.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    params = _ModelParams(src) if isinstance(src, GptOss) else _FolderParams(src)
    cfg = params.config
    float_dt = dtype_name(np.dtype(jnp.dtype(dtype)))
    items = export_items(cfg, params.experts)
    specs = layout_tensors(cfg, TRANSFORMERS, "mxfp4")
    if [s.name for s in specs] != [hf for _, hf, _ in items]:
        raise AssertionError("name table: export_items and layout_tensors disagree on the tensor order")
    entries = [(s.name, "U8" if "U8" in s.dtypes else float_dt, s.shape) for s in specs]
    total = sum(int(np.prod(shape)) * DTYPES[dt].itemsize for _, dt, shape in entries)
    log.info("exporting %s (%s experts) to %s: transformers layout, %d tensors, %s, shards <= %s", params.name,
             params.experts, out, len(entries), human_bytes(total), human_bytes(max_shard_bytes))
    with atomic_folder(out, overwrite) as tmp:
        with Progress("export", total, len(entries), progress) as bar:
            def values():
                for (ours, hf, to_checkpoint), (_, dt, shape) in zip(items, entries):
                    a = np.asarray(to_checkpoint(params.get(ours)))
                    if tuple(a.shape) != tuple(shape):
                        raise AssertionError(f"{ours} -> {hf}: shape {a.shape}, expected {shape}")
                    a = a.astype(DTYPES[dt], copy=False)
                    bar.update(a.nbytes)
                    yield hf, a
                    del a  # written: do not hold it while the next group is read

            weight_map = write_shards(tmp, entries, values(), max_shard_bytes=max_shard_bytes, single_file=None)
        write_json(os.path.join(tmp, "config.json"), cfg.to_hf_dict(quantized=True))
        files = {**params.files, **(extra_files or {})}
        files.pop(MARKER, None)
        names = copy_files(files, tmp)
        log.info("exported %s into %d shards; copied %s", bar.summary(), len(set(weight_map.values())),
                 ", ".join(names) if names else "no tokenizer/generation files")
    log.info("done: %s", out)
    return out
