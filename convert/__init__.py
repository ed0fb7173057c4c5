"""Official gpt-oss checkpoints <-> gptoss-jax: the name table, readers, writers, conversion.

    convert.convert_checkpoint("gpt-oss-20b", "gpt-oss-20b-jax")      # official folder -> ours (Orbax)
    model = gptoss_jax.load("gpt-oss-20b-jax", mesh=mesh)             # restores sharded
    convert.save_checkpoint(model, "tuned-jax")                       # an in-memory model -> ours
    convert.export_official("tuned-jax", "tuned-hf")                  # ours -> transformers layout

The public functions are imported on first use, so ``convert.names`` and the readers stay light.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "convert_checkpoint": "convert.to_orbax",
    "save_checkpoint": "convert.orbax_format",
    "export_official": "convert.export",
    "carried_files": "convert.official",
    "CheckpointError": "convert.names",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
