"""Writing a (merged) model to disk.

SEAM — to be replaced by the converter once merged: ``convert.save_checkpoint(model, dst)`` (our
Orbax format) and ``convert.export_official(model, out)``. Until then :func:`write_model` writes the
official transformers layout (config.json + model.safetensors) through the one name table
(``convert.names``), which both ``gptoss_jax.load`` and transformers read.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax import nnx

from convert import safetensors_file
from convert.names import export_items
from gptoss_jax.loading import flat_paths
from gptoss_jax.model import GptOss


def write_model(model: GptOss, out: str | os.PathLike) -> str:
    """Write ``model`` as an official transformers-layout folder at ``out`` (atomic: temp folder, rename).

    Packed experts are written as MXFP4 ``*_blocks``/``*_scales``; dense experts as bf16/f32
    ``gate_up_proj``/``down_proj`` [E, in, out] (transformers' dense layout).
    """
    out = os.fspath(out)
    cfg = model.config
    params = flat_paths(nnx.state(model, nnx.Param))
    packed = model.expert_format == "mxfp4"
    items = []
    for ours, hf, to_checkpoint in export_items(cfg):
        if not packed and ours.endswith(("_blocks", "_scales")):
            if ours.endswith("_scales"):
                continue
            ours, hf, to_checkpoint = ours.replace("_blocks", "_kernel"), hf.replace("_blocks", ""), np.asarray
        items.append((hf, lambda ours=ours, f=to_checkpoint: f(np.asarray(params[ours][...]))))
    # one tensor on the host at a time: a first pass takes the header, the second streams the data
    specs = []
    for name, tensor in items:
        a = tensor()
        specs.append((name, safetensors_file.dtype_name(a.dtype), a.shape))
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    safetensors_file.write(os.path.join(tmp, "model.safetensors"), ((n, t()) for n, t in items), {"format": "pt"},
                           specs=specs)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(quantized=packed), f, indent=2)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
