"""``gptoss_jax.load``: a checkpoint folder -> a :class:`GptOss` model, through one path.

Both sources (an official folder in either layout, or a folder written by ``gptoss-jax convert``)
end in :func:`build_model`: the abstract model (``nnx.eval_shape``) gives every parameter's shape,
dtype and sharding, the source fills them, and the model is placed on the mesh. Official tensors
become ours through the single name table (:func:`gptoss_jax.checkpoint.names.plan`), read one at a
time by :func:`build_items` (also what ``convert`` writes from). The lossy-quantization warning is
:func:`warn_if_lossy`, the only one.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.names import Item, plan
from gptoss_jax.checkpoint.official import OfficialCheckpoint, open_checkpoint
from gptoss_jax.checkpoint.orbax import convert_experts, group_of, is_converted, read_marker, restore_values
from gptoss_jax.checkpoint.shapes import EXPERT_FORMATS, abstract_model, flat_paths
from gptoss_jax import platform
from gptoss_jax.config import GptOssConfig
from gptoss_jax.layers.moe import EXPERT_LAYOUTS, layout_for, set_expert_layout
from gptoss_jax.model import GptOss
from gptoss_jax.sharding import Layout, get_rules, state_shardings, use_layout

log = logging.getLogger(__name__)


def load(path: str | os.PathLike, dtype=jnp.bfloat16, experts: str | None = None, *, layout: str | None = None,
         mesh: jax.sharding.Mesh | None = None, rules=None, expert_layout: str | None = None) -> GptOss:
    """Load a gpt-oss checkpoint folder.

    path: an official folder in the transformers layout (repository root) or the ``original/``
      layout, auto-detected (``layout=`` forces one); or a folder written by ``gptoss-jax convert``
      (restored with Orbax straight into each parameter's sharding).
    dtype: dtype of the dense weights and activations (jnp.bfloat16, or jnp.float32 for parity).
    experts: None keeps what the folder stores (packed MXFP4 or dense); 'mxfp4' keeps expert weights
      packed in device memory (quantizing dense ones: lossy, warned); 'dense' stores them in ``dtype``.
    mesh, rules: place each parameter on ``mesh`` as its logical axes map through ``rules`` (a preset
      name of :data:`gptoss_jax.sharding.PRESETS` or a table; default
      :data:`gptoss_jax.sharding.DEFAULT_RULES`) and run the model there; without a mesh, the default device.
    expert_layout: how packed experts are stored (:data:`gptoss_jax.layers.moe.EXPERT_LAYOUTS`): None picks
      it from where the parameters live ('tpu' on TPU devices: u32 words and scales with the output dim
      minor, read as stored by the TPU kernel; else 'checkpoint', the u8 blocks as in the file).
    """
    if experts is not None and experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS} or None, got {experts!r}")
    if os.path.isdir(path) and is_converted(path):
        if layout is not None:
            raise ValueError(f"{path} is a gptoss-jax checkpoint; layout= applies to official folders only")
        return restore_model(path, dtype, experts, mesh=mesh, rules=rules, expert_layout=expert_layout)
    ckpt = open_checkpoint(path, layout)
    experts = ckpt.experts if experts is None else experts
    items = plan(ckpt.config, ckpt.layout, ckpt.experts, experts)
    log.info("loading %s (%s layout, %d tensors) as %s, experts %s", ckpt.folder, ckpt.layout, len(ckpt.specs),
             jnp.dtype(dtype).name, experts)

    def read(targets, shardings):  # one group at a time through host memory
        values = {}
        for group_items in by_group(items).values():
            arrays = build_items(ckpt, group_items, lambda p: targets[p].dtype)
            values.update({p: jax.device_put(a, shardings[p]) for p, a in arrays.items()})
        return values

    return build_model(ckpt.config, dtype, experts, ckpt.experts, ckpt.folder, read, mesh, rules, expert_layout)


def restore_model(path: str | os.PathLike, dtype=jnp.bfloat16, experts: str | None = None, *,
                  mesh: jax.sharding.Mesh | None = None, rules=None, expert_layout: str | None = None) -> GptOss:
    """Our folder -> :class:`GptOss` (what :func:`load` does for these folders).

    Stored MXFP4 experts asked for as ``dense`` are decoded on device (exact); stored dense experts
    asked for as ``mxfp4`` are quantized on device (lossy, warned); ``experts=None`` keeps what is stored.
    """
    marker = read_marker(path)
    cfg, stored = marker.config, marker.experts
    experts = stored if experts is None else experts
    log.info("restoring %s (%s experts stored, as %s %s)%s", marker.folder, stored, experts, jnp.dtype(dtype).name,
             f" onto mesh {dict(mesh.shape)}" if mesh is not None else "")

    def read(targets, shardings):
        if stored == experts:
            return restore_values(marker, targets, shardings)
        stored_abstract = nnx.split(abstract_model(cfg, dtype, stored))[1]
        values = restore_values(marker, flat_paths(stored_abstract), _shardings(stored_abstract, mesh, rules))
        return convert_experts(values, stored, shardings, targets)

    return build_model(cfg, dtype, experts, stored, marker.folder, read, mesh, rules, expert_layout)


def build_model(cfg: GptOssConfig, dtype, experts: str, stored: str, source: str,
                read: Callable[[dict, dict], dict[str, jax.Array]], mesh=None, rules=None,
                expert_layout: str | None = None) -> GptOss:
    """The one place parameters become a model.

    read(targets, shardings): {path: ShapeDtypeStruct}, {path: Sharding | None} -> {path: array},
    every parameter of ``GptOss(cfg, dtype, experts)`` with that shape and dtype (checked here).
    ``expert_layout``: as :func:`load`'s (None: from the platform the parameters were placed on).
    """
    if expert_layout is not None and expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS} or None, got {expert_layout!r}")
    warn_if_lossy(source, stored, experts)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, experts))
    targets = flat_paths(abstract)
    values = read(targets, _shardings(abstract, mesh, rules))
    for p, t in targets.items():
        if p not in values:
            raise CheckpointError(f"{source}: parameter '{p}' was not read")
        if tuple(values[p].shape) != tuple(t.shape) or values[p].dtype != t.dtype:
            raise CheckpointError(f"{source}: parameter '{p}' is {values[p].dtype}{list(values[p].shape)}, "
                                  f"the model needs {t.dtype}{list(t.shape)}")
    for path, var in nnx.to_flat_state(abstract):
        var.set_value(values[".".join(map(str, path))])  # keeps the Variables' logical-axis metadata
    model = nnx.merge(graphdef, abstract)
    if mesh is not None:
        use_layout(model, Layout(mesh, rules))  # the MoE runs expert-parallel
    placed_on = platform.of(jax.tree.leaves(nnx.state(model, nnx.Param)), default="cpu")
    return set_expert_layout(model, expert_layout or layout_for(placed_on))


def warn_if_lossy(source: str, stored: str, experts: str, hint: str = "experts='dense'") -> None:
    """Dense experts stored, packed asked for: MXFP4 quantization loses precision; say so once."""
    if stored == "dense" and experts == "mxfp4":
        log.warning("%s stores dense experts; quantizing them to MXFP4 (lossy). Pass %s to keep them.", source, hint)


def by_group(items: list[Item]) -> dict[str, list[Item]]:
    """Items by parameter group (embedding, layers.N, ...), in table order."""
    out: dict[str, list[Item]] = {}
    for it in items:
        out.setdefault(group_of(it.ours), []).append(it)
    return out


def build_items(ckpt: OfficialCheckpoint, items: list[Item], dtype_of: Callable[[str], np.dtype],
                reads: collections.Counter | None = None,
                on_read: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Our parameters ``items`` built from ``ckpt``, each cast to ``dtype_of(path)``: each source read
    once and dropped as soon as the last parameter made from it is built (``reads`` counts the reads,
    ``on_read(nbytes)`` is told of each)."""
    uses = collections.Counter(s for it in items for s in it.sources)
    cache: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for it in items:
        for s in it.sources:
            if s not in cache:
                cache[s] = ckpt.read(s)
                if reads is not None:
                    reads[s] += 1
                if on_read is not None:
                    on_read(cache[s].nbytes)
        arr = np.asarray(it.build([cache[s] for s in it.sources]))
        if tuple(arr.shape) != tuple(it.shape):
            raise CheckpointError(f"{ckpt.folder}: {list(it.sources)} give {it.ours} shape {arr.shape}, "
                                  f"expected {it.shape}")
        out[it.ours] = arr.astype(dtype_of(it.ours), copy=False)
        del arr
        for s in it.sources:
            uses[s] -= 1
            if not uses[s]:
                del cache[s]
    return out


def _shardings(abstract_state, mesh, rules) -> dict[str, jax.sharding.Sharding | None]:
    if mesh is None:
        return {p: None for p in flat_paths(abstract_state)}
    return flat_paths(state_shardings(abstract_state, mesh, get_rules(rules)))
