"""optax AdamW with global-norm clipping and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup 0 -> learning_rate over warmup_steps, cosine to end_learning_rate at ``steps``."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, max(steps, 1),
                                              cfg.end_learning_rate)


def float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``inner`` in float32 (state, gradients, parameters) whatever the parameter dtype; updates
    come back in each parameter's dtype. Keeps AdamW moments in float32 for bfloat16 weights."""

    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    def init(params):
        return inner.init(f32(params))

    def update(grads, state, params=None):
        updates, state = inner.update(f32(grads), state, None if params is None else f32(params))
        return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay on matrices only, not on biases, norms or sinks) behind clipping."""
    adamw = optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return float32_state(optax.chain(*parts, adamw))
