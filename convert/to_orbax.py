"""Official checkpoint folder -> our Orbax folder (:mod:`convert.orbax_format`), streaming.

The source is opened and validated by :func:`gptoss_jax.checkpoint.official.open_checkpoint` (names, shapes, dtypes
against its config; truncated shards, index naming missing files). Parameters are built through the
name table's :func:`gptoss_jax.checkpoint.names.plan` one group (a layer, the embedding...) at a time: each source
tensor is read once (one tensor in memory at a time; a fused ``qkv`` stays until its three parts are
built), transformed, cast, and the group is saved before the next one is read. Peak host memory is
the largest group plus the tensor being transformed, not the model.

Accounting: before writing, the plan must fill every parameter exactly once and use every source
tensor; while writing, each source tensor is read exactly once and each parameter written once.
"""
from __future__ import annotations

import collections
import logging
import os

import jax.numpy as jnp
import numpy as np

from convert.atomic import atomic_folder
from convert.orbax_format import GroupWriter, copy_files, write_marker
from convert.progress import Progress, human_bytes
from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.loader import build_items, by_group, warn_if_lossy
from gptoss_jax.checkpoint.names import BF16, Item, plan
from gptoss_jax.checkpoint.official import OfficialCheckpoint, carried_files, open_checkpoint
from gptoss_jax.checkpoint.orbax import group_of, groups_of, is_converted, is_expert_weight, release_memory
from gptoss_jax.checkpoint.shapes import param_shapes

log = logging.getLogger("convert")

#: ``--experts`` choices -> the model's expert format.
EXPERTS = {"mxfp4": "mxfp4", "bf16": "dense"}


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, experts: str = "mxfp4",
                       dtype="bfloat16", layout: str | None = None, progress=None, overwrite: bool = False) -> str:
    """Convert the official checkpoint folder ``src`` into our format at ``dst``; returns ``dst``.

    experts: 'mxfp4' keeps the experts packed (uint8 blocks + scales, as in the checkpoint); 'bf16'
      stores them dequantized as bf16 ``[E, in, out]`` kernels (4x the size; exact).
    dtype: dtype of every other weight (default bfloat16, the checkpoint's own).
    layout: 'transformers' or 'original' to force one (default: detected).
    progress: None (bar on a terminal), True, False, or a callable(nbytes) per tensor.
    overwrite: replace an existing ``dst`` (otherwise refused).
    """
    if experts not in EXPERTS:
        raise ValueError(f"experts must be one of {sorted(EXPERTS)}, got {experts!r}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (bfloat16, float16, float32), got {dtype}")
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if os.path.isdir(src) and is_converted(src):
        raise CheckpointError(f"{src}: already a gptoss-jax checkpoint; load it with gptoss_jax.load, or export it "
                              f"with --to-official")
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    ckpt = open_checkpoint(src, layout)
    cfg, model_experts = ckpt.config, EXPERTS[experts]
    warn_if_lossy(ckpt.folder, ckpt.experts, model_experts, hint="--experts bf16")
    items = plan(cfg, ckpt.layout, ckpt.experts, model_experts)
    check_plan(ckpt, items, param_shapes(cfg, model_experts))
    total = ckpt.nbytes()
    log.info("reading %s: %s layout, %d tensors, %s, %s experts", ckpt.folder, ckpt.layout, len(ckpt.files),
             human_bytes(total), ckpt.experts)
    files = carried_files(src, ckpt.folder)
    with atomic_folder(dst, overwrite) as tmp:
        log.info("writing %s: %d parameter groups, experts %s, other weights %s", dst,
                 len(groups_of(it.ours for it in items)), experts, dtype.name)
        reads: collections.Counter = collections.Counter()
        writer = GroupWriter(tmp)
        try:
            with Progress("convert", total, len(ckpt.files), progress) as bar:
                for group, group_items in by_group(items).items():
                    writer.save(group, build_group(ckpt, group_items, dtype, reads, bar))
                    release_memory()  # the group's arrays are gone: keep RSS at one group
        finally:
            writer.close()
        check_done(ckpt, reads, writer.written, param_shapes(cfg, model_experts))
        log.info("converted %s", bar.summary())
        names = copy_files(files, tmp)
        source = {"kind": "official", "path": src, "layout": ckpt.layout, "experts": ckpt.experts,
                  "tensors": len(ckpt.files), "bytes": total}
        write_marker(tmp, cfg, model_experts, dtype.name, writer.written, source, names)
        log.info("copied %s", ", ".join(names) if names else "no tokenizer/generation files (none in the source)")
    log.info("done: %s", dst)
    return dst


def storage_dtype(path: str, dtype) -> np.dtype:
    """Stored dtype of a parameter: packed experts uint8, dense experts bf16, the rest ``dtype``."""
    if path.endswith(("_blocks", "_scales")):
        return np.dtype(np.uint8)
    return BF16 if is_expert_weight(path) else np.dtype(dtype)


def check_plan(ckpt: OfficialCheckpoint, items: list[Item], expected: dict[str, tuple[int, ...]]) -> None:
    """Every parameter filled exactly once; every source tensor used, each within one group."""
    filled = collections.Counter(it.ours for it in items)
    twice = sorted(p for p, n in filled.items() if n > 1)
    if twice or set(filled) != set(expected):
        raise AssertionError(f"name table plan is inconsistent: filled twice {twice[:3]}, "
                             f"unfilled {sorted(set(expected) - set(filled))[:3]}, unknown {sorted(set(filled) - set(expected))[:3]}")
    groups: dict[str, set[str]] = collections.defaultdict(set)
    for it in items:
        for s in it.sources:
            groups[s].add(group_of(it.ours))
    for name in ckpt.files:
        if name not in groups:
            raise CheckpointError(f"{ckpt.files[name].path}: tensor '{name}' is not used by any parameter")
    for name, gs in groups.items():
        if name not in ckpt.files:
            raise CheckpointError(f"{ckpt.folder}: missing tensor '{name}'")
        if len(gs) > 1:
            raise AssertionError(f"tensor '{name}' feeds several groups {sorted(gs)}; it would be read twice")


def build_group(ckpt: OfficialCheckpoint, items: list[Item], dtype, reads: collections.Counter,
                bar: Progress) -> dict[str, np.ndarray]:
    """Our parameters of one group, in their storage dtypes (:func:`gptoss_jax.checkpoint.loader.build_items`)."""
    return build_items(ckpt, items, lambda p: storage_dtype(p, dtype), reads, bar.update)


def check_done(ckpt: OfficialCheckpoint, reads: collections.Counter, written: dict,
               expected: dict[str, tuple[int, ...]]) -> None:
    """After writing: each source tensor read exactly once, each parameter written once with its shape."""
    bad_reads = sorted(n for n in ckpt.files if reads[n] != 1) + sorted(set(reads) - set(ckpt.files))
    if bad_reads:
        raise AssertionError(f"source tensors not read exactly once: {bad_reads[:5]}")
    if set(written) != set(expected) or any(written[p][0] != expected[p] for p in expected):
        raise AssertionError(f"parameters written do not match the model: {sorted(set(written) ^ set(expected))[:5]}")
