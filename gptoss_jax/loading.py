"""``gptoss_jax.load``: official checkpoint folders (either layout) -> a :class:`GptOss` model.

Tensors are read one at a time (no full host copy of the checkpoint), turned into our parameters
through the single name table in :mod:`convert.names`, cast and placed on device. Folders written by
``gptoss-jax convert`` are restored by :func:`convert.orbax_format.restore_model`.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.layers.moe import EXPERT_FORMATS
from gptoss_jax.model import GptOss

log = logging.getLogger(__name__)


def abstract_model(cfg: GptOssConfig, dtype=jnp.bfloat16, experts: str = "mxfp4") -> GptOss:
    """A :class:`GptOss` whose parameters are ``ShapeDtypeStruct`` (no memory allocated)."""
    return nnx.eval_shape(lambda: GptOss(cfg, dtype=dtype, experts=experts, rngs=nnx.Rngs(0)))


def flat_paths(state) -> dict[str, object]:
    """nnx state -> {dotted path: leaf} (paths as used by the name table)."""
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


def load(path: str | os.PathLike, dtype=jnp.bfloat16, experts: str = "mxfp4", *, layout: str | None = None,
         mesh: jax.sharding.Mesh | None = None, rules=None) -> GptOss:
    """Load a gpt-oss checkpoint folder.

    path: an official folder in the transformers layout (repository root) or the ``original/``
      layout, auto-detected (``layout=`` forces one); or a folder written by ``gptoss-jax convert``
      (restored with Orbax straight into each parameter's sharding).
    dtype: dtype of the dense weights and activations (jnp.bfloat16, or jnp.float32 for parity).
    experts: 'mxfp4' keeps expert weights packed in device memory; 'dense' stores them in ``dtype``.
    mesh, rules: place each parameter on ``mesh`` as its logical axes map through ``rules`` (a preset
      name of :data:`gptoss_jax.sharding.PRESETS` or a table; default
      :data:`gptoss_jax.sharding.DEFAULT_RULES`) and run the model there; without a mesh, the default device.
    """
    # convert/ imports gptoss_jax.config, so it is imported here rather than at module level
    from convert.names import CheckpointError, plan
    from convert.official import open_checkpoint
    from convert.orbax_format import is_converted, restore_model

    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    if os.path.isdir(path) and is_converted(path):
        if layout is not None:
            raise ValueError(f"{path} is a gptoss-jax checkpoint; layout= applies to official folders only")
        return restore_model(path, dtype, experts, mesh=mesh, rules=rules)
    ckpt = open_checkpoint(path, layout)
    cfg = ckpt.config
    if ckpt.experts == "dense" and experts == "mxfp4":
        log.warning("%s stores dense experts; quantizing them to MXFP4 (lossy). Pass experts='dense' to keep them.",
                    ckpt.folder)
    items = plan(cfg, ckpt.layout, ckpt.experts, experts)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, experts))
    targets = flat_paths(abstract)
    shardings = layout = None
    if mesh is not None:
        from gptoss_jax.sharding import Layout, state_shardings, use_layout

        layout = Layout(mesh, rules)
        shardings = flat_paths(state_shardings(abstract, mesh, layout.rules))
    if set(targets) != {it.ours for it in items}:  # the table and the model must describe the same parameters
        raise AssertionError(f"name table and model disagree: {sorted(set(targets) ^ {it.ours for it in items})[:5]}")
    log.info("loading %s (%s layout, %d tensors) as %s, experts %s", ckpt.folder, ckpt.layout, len(ckpt.specs),
             jnp.dtype(dtype).name, experts)
    values = {}
    for item in items:
        target = targets[item.ours]
        arr = item.build([ckpt.read(s) for s in item.sources])
        if tuple(arr.shape) != tuple(target.shape):
            raise CheckpointError(f"{ckpt.folder}: {item.sources} give {item.ours} shape {arr.shape}, "
                                  f"expected {target.shape}")
        placement = None if shardings is None else shardings[item.ours]
        values[item.ours] = jax.device_put(np.asarray(arr).astype(target.dtype), placement)
    model = nnx.merge(graphdef, _fill(abstract, values))
    return model if layout is None else use_layout(model, layout)


def _fill(abstract_state, values: dict[str, jax.Array]):
    """Put concrete arrays into the abstract state's Variables (keeping their logical-axis metadata)."""
    for path, var in nnx.to_flat_state(abstract_state):
        var.set_value(values[".".join(map(str, path))])
    return abstract_state
