"""The gpt-oss transformer as Flax NNX modules (one definition for decode, training and tests).

``tokens [B, T] -> embedding -> L x (x + attn(norm(x)); x + moe(norm(x))) -> norm -> unembedding``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import platform as gptoss_platform
from gptoss_jax.config import GptOssConfig
from gptoss_jax.layers.attention import Attention, mesh_aware
from gptoss_jax.layers.common import matmul, param
from gptoss_jax.layers.kv_cache import LayerCache, init_cache
from gptoss_jax.layers.moe import PACKED, MoE
from gptoss_jax.layers.norm import RMSNorm
from gptoss_jax.layers.rope import rope_tables


class Block(nnx.Module):
    """One transformer layer: pre-norm attention and pre-norm MoE, each with a residual."""

    def __init__(self, cfg: GptOssConfig, layer: int, *, dtype, experts: str, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MoE(cfg, dtype=dtype, experts=experts, rngs=rngs)

    def __call__(self, x, cos, sin, positions, cache: LayerCache | None = None, segment_ids=None,
                 kv_len: int | None = None):
        a, cache = self.attn(self.attn_norm(x), cos, sin, positions, cache, segment_ids, kv_len)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), cache


class GptOss(nnx.Module):
    """gpt-oss causal LM. ``embedding`` / ``unembedding`` [V, H] (untied), ``layers``, final ``norm``.

    ``dtype`` is the dtype of the dense weights and activations (bfloat16, or float32 for parity);
    ``experts`` is ``'mxfp4'`` (packed, decoded inside the expert matmuls) or ``'dense'``.
    """

    def __init__(self, cfg: GptOssConfig, *, dtype=jnp.bfloat16, experts: str = PACKED,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.expert_format = experts
        self.layout = None  # a gptoss_jax.sharding.Layout when placed on a mesh (shard_model)
        v, h = cfg.vocab_size, cfg.hidden_size
        self.embedding = param(jax.random.normal(rngs.params(), (v, h)).astype(dtype), ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, experts=experts, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        self.unembedding = param((0.02 * jax.random.normal(rngs.params(), (v, h))).astype(dtype), ("vocab", "embed"))

    @mesh_aware
    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      cache: list[LayerCache] | None = None, segment_ids: jax.Array | None = None,
                      kv_len: int | None = None) -> tuple[jax.Array, list[LayerCache] | None]:
        """tokens [B, T] int32, positions [B, T] (default 0..T-1; < 0 = padding) -> final-normed [B, T, H].

        ``segment_ids`` [B, T]: packed samples (positions restart per sample); attention stays within a segment.
        ``kv_len`` (static, with a cache; every position must be below it): full-attention layers attend
        over their first ``kv_len`` cache slots only (the decode step's length bucket); the cache is
        still updated whole.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._boundary(jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype))
        cos, sin = rope_tables(jnp.maximum(positions, 0), self.config)
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.layers):
            x, c = block(x, cos, sin, positions, None if cache is None else cache[i], segment_ids, kv_len)
            x = self._boundary(x)
            if cache is not None:
                new_cache.append(c if self.layout is None else self.layout.cache(c))
        return self.norm(x), new_cache

    def _boundary(self, x: jax.Array) -> jax.Array:
        """The residual stream between blocks, constrained to the layout's batch split when on a mesh, and
        materialized once per block in programs traced for TPU (:func:`gptoss_platform.current`): XLA:TPU otherwise reassociates the residual adds into one
        fusion at the end and duplicates the partial sums into each block's consumers, keeping every
        block's outputs live to the end (4.5 of the 12 GB live at the peak of a 20b prefill of 32,768
        tokens)."""
        x = x if self.layout is None else self.layout.residual(x)
        return jax.lax.optimization_barrier(x) if gptoss_platform.current() == "tpu" else x

    def unembed(self, x: jax.Array) -> jax.Array:
        """[..., H] -> float32 logits [..., V]."""
        lead = x.shape[:-1]
        return matmul(x.reshape(-1, x.shape[-1]), self.unembedding[...], "mh,vh->mv").reshape(*lead, -1)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: list[LayerCache] | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, list[LayerCache] | None]:
        """tokens [B, T] -> (float32 logits [B, T, V], updated cache or None)."""
        x, cache = self.hidden_states(tokens, positions, cache, segment_ids)
        return self.unembed(x), cache

    def init_cache(self, batch: int, context: int) -> list[LayerCache]:
        """Empty per-layer caches (created in their shards when the model is on a mesh)."""
        if self.layout is not None:
            return self.layout.init_cache(self.config, batch, context, self.dtype)
        return init_cache(self.config, batch, context, self.dtype)

    def logits(self, tokens, mask=None) -> jax.Array:
        """int [B, T] tokens -> float32 [B, T, V] logits (jitted).

        ``mask`` [B, T] (1 = real token, 0 = padding; left or right padding) gives each row positions
        0.. over its real tokens; padded positions' logits are undefined.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        if mask.shape != tokens.shape:
            raise ValueError(f"mask shape {mask.shape} does not match tokens shape {tokens.shape}")
        graphdef, state = nnx.split(self)
        return _logits(graphdef, state, tokens, mask)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """[B, T] bool -> positions counting real tokens from 0, -1 on padding."""
    mask = mask.astype(bool)
    return jnp.where(mask, jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, -1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, mask):
    model = nnx.merge(graphdef, state)
    return model(tokens, positions_from_mask(mask))[0]
