"""Official gpt-oss checkpoints <-> gptoss-jax: the name table, readers, writers, conversion.

    convert.convert_checkpoint("gpt-oss-20b", "gpt-oss-20b-jax")      # official folder -> ours (Orbax)
    model = gptoss_jax.load("gpt-oss-20b-jax", mesh=mesh)             # restores sharded
    convert.save_checkpoint(model, "tuned-jax")                       # an in-memory model -> ours
    convert.export_official("tuned-jax", "tuned-hf")                  # ours -> transformers layout

The readers (name table, official folders, our folders, ``gptoss_jax.load``) are the library's
:mod:`gptoss_jax.checkpoint`; this package holds the writers and imports the library, never the
reverse. The public functions are imported on first use.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "convert_checkpoint": "convert.to_orbax",
    "save_checkpoint": "convert.orbax_format",
    "export_official": "convert.export",
    "carried_files": "gptoss_jax.checkpoint.official",
    "CheckpointError": "gptoss_jax.checkpoint.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
