"""gptoss-jax: exact JAX/Flax gpt-oss.

    model = gptoss_jax.load("path/to/gpt-oss-20b", dtype=jnp.bfloat16)
    logits = model.logits(tokens)          # int32 [B, T] -> float32 [B, T, V]
"""
from gptoss_jax.config import PRESETS, ConfigError, GptOssConfig, get_preset
from gptoss_jax.loading import load
from gptoss_jax.model import GptOss

__all__ = ["GptOss", "GptOssConfig", "PRESETS", "ConfigError", "get_preset", "load"]
__version__ = "0.1.0"
