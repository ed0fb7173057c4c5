"""LoRA adapters as explicit, optional sub-modules of the layers: ``Attention.lora`` and ``MoE.lora``
are ``None`` unless ``train.lora.add_lora`` attaches an :class:`AttentionLoRA` / :class:`ExpertLoRA`.

Each adapted projection is an :class:`Adapter`: ``a`` [in..., r] and ``b`` [r, out...]
(``nnx.LoRAParam``, with logical axes like every parameter); the update is
``scale * (dropout(x) A) B`` with ``scale = alpha / r``; dropout applies while ``key`` holds a
:class:`LoRAKey` (set per training step).
"""
from __future__ import annotations

import jax
from flax import nnx


class LoRAKey(nnx.Variable):
    """The dropout key of one module's adapters (set per step while training)."""


class Adapter(nnx.Module):
    """One projection's low-rank pair: ``a`` [in..., r], ``b`` [r, out...] (experts: a leading E axis)."""

    def __init__(self, a: jax.Array, b: jax.Array, a_axes: tuple, b_axes: tuple):
        self.a = nnx.LoRAParam(a, out_sharding=a_axes, eager_sharding=False)
        self.b = nnx.LoRAParam(b, out_sharding=b_axes, eager_sharding=False)


class _Adapters(nnx.Module):
    def __init__(self, scale: float, dropout: float):
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.key: LoRAKey | None = nnx.data(None)

    def dropout_key(self, index: int) -> jax.Array | None:
        """The key for projection ``index`` of this module (None: no dropout now)."""
        return None if self.key is None else jax.random.fold_in(self.key[...], index)


class AttentionLoRA(_Adapters):
    """Adapters of one attention layer's q/k/v/o projections (each optional)."""

    def __init__(self, q: Adapter | None, k: Adapter | None, v: Adapter | None, o: Adapter | None, *,
                 scale: float, dropout: float):
        super().__init__(scale, dropout)
        self.q, self.k, self.v, self.o = q, k, v, o


class ExpertLoRA(_Adapters):
    """Per-expert adapters of one MoE layer: ``gate_up`` a [E, H, r], b [E, r, 2I]; ``down`` a [E, I, r],
    b [E, r, H] (each optional)."""

    def __init__(self, gate_up: Adapter | None, down: Adapter | None, *, scale: float, dropout: float):
        super().__init__(scale, dropout)
        self.gate_up, self.down = gate_up, down
