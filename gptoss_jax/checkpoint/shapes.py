"""Parameter shapes, declared once: by the layer constructors, read through ``nnx.eval_shape``.

    param_shapes(cfg, "mxfp4")["layers.0.attn.qkv_kernel"]   # (H, nkv, nq/nkv + 2, D)
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from gptoss_jax.config import GptOssConfig
from gptoss_jax.layers.moe import EXPERT_FORMATS
from gptoss_jax.model import GptOss

__all__ = ["EXPERT_FORMATS", "abstract_model", "flat_paths", "param_shapes"]


def abstract_model(cfg: GptOssConfig, dtype=jnp.bfloat16, experts: str = "mxfp4") -> GptOss:
    """A :class:`GptOss` whose parameters are ``ShapeDtypeStruct`` (no memory allocated)."""
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    return nnx.eval_shape(lambda: GptOss(cfg, dtype=dtype, experts=experts, rngs=nnx.Rngs(0)))


def flat_paths(state) -> dict[str, object]:
    """nnx state -> {dotted path: leaf} (paths as used by the name table)."""
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


@functools.lru_cache(maxsize=16)
def _shapes(cfg: GptOssConfig, experts: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    state = nnx.state(abstract_model(cfg, jnp.bfloat16, experts), nnx.Param)
    return tuple((p, tuple(v.shape)) for p, v in flat_paths(state).items())


def param_shapes(cfg: GptOssConfig, experts: str = "mxfp4") -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ``GptOss(cfg, experts=experts)``, keyed by dotted path."""
    return dict(_shapes(cfg, experts))
