"""LoRA adapters attached to the model's own layers, as their explicit ``lora`` field.

Why adapters on the modules rather than a separate pytree: the model definition stays the one used
for serving (``Attention.lora`` / ``MoE.lora`` are None there; see :mod:`gptoss_jax.layers.lora`),
``nnx.split(model, nnx.LoRAParam, ...)`` separates the trainable adapters from the frozen
(MXFP4-packed) base in one call, and adapters carry logical axes like every parameter, so the same
sharding rules place them.

Shapes (r = rank), per layer: attention ``lora.q.a`` [H, r], ``lora.q.b`` [r, nq, D], ``lora.k/v.b``
[r, nkv, D], ``lora.o.a`` [nq, D, r], ``lora.o.b`` [r, H]; experts, one pair per expert:
``lora.gate_up.a`` [E, H, r], ``lora.gate_up.b`` [E, r, 2I], ``lora.down.a`` [E, I, r],
``lora.down.b`` [E, r, H]. A is drawn from U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default), B is zero,
so a fresh adapter leaves the model unchanged. The update is ``alpha / r * (dropout(x) A) B``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import mxfp4
from gptoss_jax.layers import qkv
from gptoss_jax.layers.attention import Attention
from gptoss_jax.layers.lora import Adapter, AttentionLoRA, ExpertLoRA, LoRAKey
from gptoss_jax.layers.moe import MoE
from gptoss_jax.model import GptOss

ATTENTION_TARGETS = ("q", "k", "v", "o")
EXPERT_TARGETS = ("gate_up", "down")
#: einsum of A [in..., r] and B [r, out...] into the base weight's shape (legend: gptoss_jax.layers)
DELTA_SPECS = {"q": "hr,rnd->hnd", "k": "hr,rkd->hkd", "v": "hr,rkd->hkd", "o": "ndr,rh->ndh",
               "gate_up": "eir,ero->eio", "down": "eir,ero->eio"}


def _attention_adapter(cfg, name: str, rank: int, key, dtype) -> Adapter:
    """A fresh adapter for attention projection ``name``: q [H, nq, D], k/v [H, nkv, D] (the parts of
    the fused qkv kernel, as separate projections), o [nq, D, H]."""
    h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if name == "o":
        a_shape, a_axes, b_shape, b_axes = (nq, d, rank), ("heads", "head_dim", None), (rank, h), (None, "embed")
    else:
        n, heads = (nq, "heads") if name == "q" else (nkv, "kv_heads")
        a_shape, a_axes, b_shape, b_axes = (h, rank), ("embed", None), (rank, n, d), (None, heads, "head_dim")
    return _fresh(a_shape, a_axes, b_shape, b_axes, int(np.prod(a_shape[:-1])), key, dtype)


def _expert_adapter(cfg, name: str, rank: int, key, dtype) -> Adapter:
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    n_in, n_out, ax_in, ax_out = (h, 2 * i, "embed", "mlp") if name == "gate_up" else (i, h, "mlp", "embed")
    return _fresh((e, n_in, rank), ("experts", ax_in, None), (e, rank, n_out), ("experts", None, ax_out), n_in, key,
                  dtype)


def _fresh(a_shape, a_axes, b_shape, b_axes, fan_in: int, key, dtype) -> Adapter:
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound).astype(dtype)
    return Adapter(a, jnp.zeros(b_shape, dtype), a_axes, b_axes)


def lora_modules(model: GptOss):
    """Every layer's attention and MoE (the modules that can hold adapters), in order."""
    for block in model.layers:
        yield block.attn
        yield block.mlp


def add_lora(model: GptOss, rank: int, alpha: float, dropout: float = 0.0, targets=ATTENTION_TARGETS + EXPERT_TARGETS,
             seed: int = 0, dtype=jnp.float32) -> GptOss:
    """Attach fresh adapters (float32 by default) to ``model`` in place; returns it."""
    key = jax.random.PRNGKey(seed)
    index = (ATTENTION_TARGETS + EXPERT_TARGETS).index
    attn_t = [t for t in ATTENTION_TARGETS if t in targets]
    moe_t = [t for t in EXPERT_TARGETS if t in targets]
    m = 0
    for block in model.layers:
        if attn_t:
            k = jax.random.fold_in(key, m)
            made = {n: _attention_adapter(model.config, n, rank, jax.random.fold_in(k, index(n)), dtype)
                    for n in attn_t}
            block.attn.lora = AttentionLoRA(made.get("q"), made.get("k"), made.get("v"), made.get("o"),
                                            scale=float(alpha) / rank, dropout=dropout)
            m += 1
        if moe_t:
            k = jax.random.fold_in(key, m)
            made = {n: _expert_adapter(model.config, n, rank, jax.random.fold_in(k, index(n)), dtype) for n in moe_t}
            block.mlp.lora = ExpertLoRA(made.get("gate_up"), made.get("down"), scale=float(alpha) / rank,
                                        dropout=dropout)
            m += 1
    return model


def adapters(model: GptOss) -> list[Adapter]:
    """Every attached adapter, in layer order (q, k, v, o, gate_up, down)."""
    out = []
    for block in model.layers:
        a, e = block.attn.lora, block.mlp.lora
        out += [] if a is None else [x for x in (a.q, a.k, a.v, a.o) if x is not None]
        out += [] if e is None else [x for x in (e.gate_up, e.down) if x is not None]
    return out


def has_lora(model: GptOss) -> bool:
    return any(module.lora is not None for module in lora_modules(model))


def set_dropout_key(model: GptOss, key: jax.Array | None) -> None:
    """Give each adapted module its own dropout key derived from ``key`` (None: no dropout)."""
    for m, module in enumerate(lora_modules(model)):
        lo = module.lora
        if lo is not None:
            lo.key = None if key is None or not lo.dropout else LoRAKey(jax.random.fold_in(key, m))


def delta(adapter: Adapter, spec: str, scale: float) -> jax.Array:
    """scale * A B in float32, shaped like the base weight (experts: our dense [E, in, out])."""
    a, b = adapter.a[...].astype(jnp.float32), adapter.b[...].astype(jnp.float32)
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST) * scale


def _add_to(var: nnx.Param, delta: jax.Array) -> None:
    var.set_value((var[...].astype(jnp.float32) + delta).astype(var.dtype))


def _add_to_qkv(attn: Attention, name: str, delta: jax.Array) -> None:
    """Add the q ([H, nq, D]), k or v ([H, nkv, D]) ``delta`` to its slots of the fused kernel
    [H, nkv, G+2, D] (:mod:`gptoss_jax.layers.qkv`)."""
    kernel = attn.qkv_kernel
    h, nkv, slots, d = kernel.shape
    part = delta.reshape(h, nkv, slots - 2, d) if name == "q" else delta
    index = (slice(None), slice(None), qkv.slot(name, slots - 2))
    w = kernel[...]
    kernel.set_value(w.at[index].set((w[index].astype(jnp.float32) + part).astype(w.dtype)))


def _merge_experts(moe: MoE, name: str, delta: jax.Array) -> None:
    """Packed experts are decoded (exactly), updated and re-quantized to MXFP4; dense ones summed."""
    if moe.expert_format == "dense":
        _add_to(moe.gate_up_kernel if name == "gate_up" else moe.down_kernel, delta)
        return
    layout = moe.expert_layout  # experts in the TPU layout are merged in the checkpoint's and converted back
    moe.set_expert_layout("checkpoint")
    blocks, scales = (moe.gate_up_blocks, moe.gate_up_scales) if name == "gate_up" else (moe.down_blocks,
                                                                                         moe.down_scales)
    w = mxfp4.unpack(blocks[...], scales[...], jnp.float32) + jnp.swapaxes(delta, 1, 2)
    new_blocks, new_scales = jax.jit(mxfp4.quantize)(w)
    blocks.set_value(new_blocks)
    scales.set_value(new_scales)
    moe.set_expert_layout(layout)


def merge_lora(model: GptOss) -> GptOss:
    """Fold every adapter into its base weight, in place, and remove the adapters.

    Attention kernels (q, k and v: their slots of the fused kernel) and dense experts get ``W + scale A B`` (float32 sum, one rounding to the
    weight dtype). Packed experts are decoded (exactly), updated and re-quantized to MXFP4.
    """
    for block in model.layers:
        lo = block.attn.lora
        if lo is not None:
            for name, adapter in (("q", lo.q), ("k", lo.k), ("v", lo.v), ("o", lo.o)):
                if adapter is None:
                    continue
                update = delta(adapter, DELTA_SPECS[name], lo.scale)
                if name == "o":
                    _add_to(block.attn.o_kernel, update)
                else:
                    _add_to_qkv(block.attn, name, update)
            block.attn.lora = None
        lo = block.mlp.lora
        if lo is not None:
            for name, adapter in (("gate_up", lo.gate_up), ("down", lo.down)):
                if adapter is not None:
                    _merge_experts(block.mlp, name, delta(adapter, DELTA_SPECS[name], lo.scale))
            block.mlp.lora = None
    return model
