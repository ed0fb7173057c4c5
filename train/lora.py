"""LoRA adapters as ``nnx.LoRAParam`` variables attached to the model's own modules.

Why variables on the modules rather than a separate pytree: the model definition stays the one used
for serving (``Attention`` and ``MoE`` add the update when an adapter is present), ``nnx.split(model,
nnx.LoRAParam, ...)`` separates the trainable adapters from the frozen (MXFP4-packed) base in one
call, and adapters carry logical axes like every parameter, so the same sharding rules place them.

Shapes (r = rank), per layer: attention ``q/k/v_lora_a`` [H, r], ``q_lora_b`` [r, nq, D],
``k/v_lora_b`` [r, nkv, D], ``o_lora_a`` [nq, D, r], ``o_lora_b`` [r, H]; experts, one pair per
expert: ``gate_up_lora_a`` [E, H, r], ``gate_up_lora_b`` [E, r, 2I], ``down_lora_a`` [E, I, r],
``down_lora_b`` [E, r, H]. A is drawn from U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default), B is zero,
so a fresh adapter leaves the model unchanged. The update is ``alpha / r * (dropout(x) A) B``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.model import GptOss

ATTENTION_TARGETS = ("q", "k", "v", "o")
EXPERT_TARGETS = ("gate_up", "down")


class LoRAKey(nnx.Variable):
    """The dropout key of one module's adapters (set per step while training)."""


def _attention_shapes(attn, name: str, rank: int):
    """(A shape, A axes, B shape, B axes) for projection ``name`` of an ``Attention`` module."""
    kernel = getattr(attn, f"{name}_kernel")
    axes = kernel.get_metadata()["out_sharding"]
    if name == "o":  # [nq, D, H]
        return (*kernel.shape[:2], rank), (*axes[:2], None), (rank, kernel.shape[2]), (None, axes[2])
    return (kernel.shape[0], rank), (axes[0], None), (rank, *kernel.shape[1:]), (None, *axes[1:])


def _expert_shapes(moe, name: str, rank: int, cfg):
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    n_in, n_out, ax_in, ax_out = (h, 2 * i, "embed", "mlp") if name == "gate_up" else (i, h, "mlp", "embed")
    return (e, n_in, rank), ("experts", ax_in, None), (e, rank, n_out), ("experts", None, ax_out)


def lora_modules(model: GptOss, targets=ATTENTION_TARGETS + EXPERT_TARGETS):
    """(module, target names) for every layer's attention and MoE that receive adapters."""
    attn_t = [t for t in ATTENTION_TARGETS if t in targets]
    moe_t = [t for t in EXPERT_TARGETS if t in targets]
    for block in model.layers:
        if attn_t:
            yield block.attn, attn_t
        if moe_t:
            yield block.mlp, moe_t


def add_lora(model: GptOss, rank: int, alpha: float, dropout: float = 0.0, targets=ATTENTION_TARGETS + EXPERT_TARGETS,
             seed: int = 0, dtype=jnp.float32) -> GptOss:
    """Attach fresh adapters (float32 by default) to ``model`` in place; returns it."""
    key = jax.random.PRNGKey(seed)
    for m, (module, names) in enumerate(lora_modules(model, targets)):
        for name in names:
            a_shape, a_axes, b_shape, b_axes = _attention_shapes(module, name, rank) if name in ATTENTION_TARGETS \
                else _expert_shapes(module, name, rank, model.config)
            fan_in = int(np.prod(a_shape[1:-1] if name in EXPERT_TARGETS else a_shape[:-1]))
            bound = 1.0 / np.sqrt(fan_in)
            k = jax.random.fold_in(jax.random.fold_in(key, m), (ATTENTION_TARGETS + EXPERT_TARGETS).index(name))
            a = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound).astype(dtype)
            setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=a_axes, eager_sharding=False))
            setattr(module, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros(b_shape, dtype), out_sharding=b_axes,
                                                            eager_sharding=False))
        module.lora_scale = float(alpha) / rank
        module.lora_dropout = float(dropout)
    return model


def has_lora(model: GptOss) -> bool:
    return any(hasattr(module, "lora_scale") for module, _ in lora_modules(model))


def set_dropout_key(model: GptOss, key: jax.Array | None) -> None:
    """Give each adapted module its own dropout key derived from ``key`` (None: no dropout)."""
    for m, (module, _) in enumerate(lora_modules(model)):
        if hasattr(module, "lora_scale"):
            module.lora_key = None if key is None or not module.lora_dropout else LoRAKey(jax.random.fold_in(key, m))


def _delta(module, name: str) -> jax.Array:
    """scale * A B in float32, shaped like the base weight (experts: our dense [E, in, out])."""
    a = getattr(module, f"{name}_lora_a")[...].astype(jnp.float32)
    b = getattr(module, f"{name}_lora_b")[...].astype(jnp.float32)
    spec = {"o": "ndr,rh->ndh", "gate_up": "eir,ero->eio", "down": "eir,ero->eio"}.get(name, "hr,rnd->hnd")
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST) * module.lora_scale


def merge_lora(model: GptOss) -> GptOss:
    """Fold every adapter into its base weight, in place, and remove the adapters.

    Attention kernels and dense experts get ``W + scale A B`` (float32 sum, one rounding to the
    weight dtype). Packed experts are decoded (exactly), updated and re-quantized to MXFP4.
    """
    for module, names in lora_modules(model):
        if not hasattr(module, "lora_scale"):
            continue
        for name in names:
            if not hasattr(module, f"{name}_lora_a"):
                continue
            delta = _delta(module, name)
            if name in ATTENTION_TARGETS or hasattr(module, f"{name}_kernel"):
                var = getattr(module, f"{name}_kernel")
                var.set_value((var[...].astype(jnp.float32) + delta).astype(var.dtype))
            else:
                blocks, scales = getattr(module, f"{name}_blocks"), getattr(module, f"{name}_scales")
                w = mxfp4.unpack(blocks[...], scales[...], jnp.float32) + jnp.swapaxes(delta, 1, 2)
                new_blocks, new_scales = jax.jit(mxfp4.quantize)(w)
                blocks.set_value(new_blocks)
                scales.set_value(new_scales)
            delattr(module, f"{name}_lora_a")
            delattr(module, f"{name}_lora_b")
        for attr in ("lora_scale", "lora_dropout", "lora_key"):
            if hasattr(module, attr):
                delattr(module, attr)
    return model
