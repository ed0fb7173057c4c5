"""gptoss-jax: exact JAX/Flax gpt-oss.

    model = gptoss_jax.load("path/to/gpt-oss-20b", dtype=jnp.bfloat16)
    logits = model.logits(tokens)          # int32 [B, T] -> float32 [B, T, V]

The names below are imported on first use, so that modules that need no JAX (the tokenizer, the
harmony format, the server's render workers) load without it.
"""
import importlib

_EXPORTS = {"PRESETS": "gptoss_jax.config", "ConfigError": "gptoss_jax.config", "GptOssConfig": "gptoss_jax.config",
            "get_preset": "gptoss_jax.config", "load": "gptoss_jax.checkpoint.loader", "GptOss": "gptoss_jax.model"}
__all__ = ["GptOss", "GptOssConfig", "PRESETS", "ConfigError", "get_preset", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptoss_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
