"""A model on a mesh: where parameters, caches and activations live, and the expert-parallel MoE.

``shard_model(model, mesh, rules)`` places every parameter by its logical axes and records a
:class:`Layout` on the model (a static attribute, part of the jit cache key). With a layout the model
constrains the residual stream and the KV cache at block boundaries (batch over the rules' batch axes)
and runs its MoE with :func:`gptoss_jax.sharding.expert_parallel.expert_parallel_forward`; without one
it is the single-device model. Results do not depend on the layout (up to float summation order).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gptoss_jax.layers.kv_cache import LayerCache, init_cache
from gptoss_jax.layers.moe import experts_forward
from gptoss_jax.sharding.expert_parallel import REDUCE, SCHEMES, expert_parallel_forward
from gptoss_jax.sharding.rules import Rules, get_rules, mesh_axes_for, named_sharding

#: Logical axes of one layer's cache (k/v [B, nkv, S, D], pos [B, S]).
CACHE_AXES = LayerCache(k=("batch", "kv_heads", None, "head_dim"), v=("batch", "kv_heads", None, "head_dim"),
                        pos=("batch", None))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh, the rule table mapping logical axes onto it, and the expert-parallel scheme."""

    mesh: Mesh
    rules: Rules | str | None = None
    moe_scheme: str = REDUCE

    def __post_init__(self):
        object.__setattr__(self, "rules", get_rules(self.rules))
        if self.moe_scheme not in SCHEMES:
            raise ValueError(f"unknown expert-parallel scheme {self.moe_scheme!r}; choose one of {SCHEMES}")

    def sharding(self, axes, shape) -> NamedSharding:
        return named_sharding(axes, shape, self.mesh, self.rules)

    def axes(self, name: str, dim: int) -> tuple[str, ...]:
        """Mesh axes a leading dimension ``name`` of size ``dim`` is split over."""
        return mesh_axes_for(name, dim, self.mesh, self.rules)

    def residual(self, x: jax.Array) -> jax.Array:
        """Constrain a [B, ...] activation: batch split over the batch axes, the rest replicated."""
        return jax.lax.with_sharding_constraint(x, self.sharding(("batch",) + (None,) * (x.ndim - 1), x.shape))

    def cache_shardings(self, cache: list[LayerCache]) -> list[LayerCache]:
        """Per-layer caches (arrays or ShapeDtypeStructs) -> the same structure of NamedSharding."""
        return [LayerCache(*(self.sharding(axes, a.shape) for axes, a in zip(CACHE_AXES, c))) for c in cache]

    def cache(self, c: LayerCache) -> LayerCache:
        return LayerCache(*(jax.lax.with_sharding_constraint(a, self.sharding(axes, a.shape))
                            for axes, a in zip(CACHE_AXES, c)))

    def init_cache(self, cfg, batch: int, context: int, dtype) -> list[LayerCache]:
        """Empty caches created directly in their shards (no full copy on one device)."""
        make = lambda: init_cache(cfg, batch, context, dtype)  # noqa: E731
        return jax.jit(make, out_shardings=self.cache_shardings(jax.eval_shape(make)))()

    def experts_forward(self, x, ids, weights, experts: dict, num_experts: int, alpha: float, limit: float,
                        batch: int, lora_dropout=None) -> jax.Array:
        """``experts_forward`` for tokens x [N = batch * T, H] whose batch is split as :meth:`residual` says."""
        if self.mesh.size == 1:
            return experts_forward(x, ids, weights, experts, num_experts, alpha, limit, lora_dropout=lora_dropout)
        return expert_parallel_forward(x, ids, weights, experts, num_experts, alpha, limit, mesh=self.mesh,
                                       expert_axes=self.axes("experts", num_experts),
                                       token_axes=self.axes("batch", batch), scheme=self.moe_scheme,
                                       lora_dropout=lora_dropout)


def _place(value, sharding: NamedSharding):
    if not sharding.is_fully_addressable and isinstance(value, jax.Array) and value.is_fully_addressable:
        value = np.asarray(value)  # every process holds the same full value; each keeps its own shards
    return jax.device_put(value, sharding)


def use_layout(model: nnx.Module, layout: Layout | None) -> nnx.Module:
    """Record ``layout`` on every submodule that reads one (the model itself and its MoE layers)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "layout"):
            node.layout = layout
    return model


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | str | None = None, *,
                moe_scheme: str = REDUCE) -> nnx.Module:
    """Place every parameter of ``model`` (in place) by its logical axes and run it on ``mesh`` from now on.

    ``rules``: a preset name (:data:`gptoss_jax.sharding.PRESETS`), a rule table or None (default rules).
    Returns the model. Arrays already placed this way are not copied.
    """
    layout = Layout(mesh, rules, moe_scheme)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("out_sharding") or (None,) * len(node.shape)
            node.set_value(_place(node.get_value(), layout.sharding(axes, node.shape)))
    return use_layout(model, layout)


def cache_shardings(cache: list[LayerCache], mesh: Mesh, rules: Rules | str | None = None) -> list[LayerCache]:
    """KV caches -> NamedSharding per array: batch over the batch axes, kv heads over ``model`` where they divide."""
    return Layout(mesh, rules).cache_shardings(cache)
