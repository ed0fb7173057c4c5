"""The one checkpoint name table: our parameter paths <-> transformers names <-> original/ names.

Both official layouts store torch ``Linear`` weights ``[out, in]`` and the experts' packed MXFP4
``[E, out, in/32, 16]`` + ``[E, out, in/32]``; they differ in names and in ``original/`` fusing
q/k/v into one ``qkv`` tensor (rows q, then k, then v), where transformers keeps three
(``q_proj``/``k_proj``/``v_proj``). Our parameters are einsum-shaped (``qkv_kernel`` [H, nkv, G+2, D]
fused per KV head as :mod:`gptoss_jax.layers.qkv` lays out, ``o_kernel`` [nq, D, H],
``router_kernel`` [H, E]; their shapes are the model's own,
:func:`gptoss_jax.checkpoint.shapes.param_shapes`); the transform column says how a checkpoint
tensor becomes ours and back. A transformers name with ``{q,k,v}`` stands for its three tensors,
whose rows stacked in that order are the original/ ``qkv`` tensor. Everything that reads or writes a checkpoint
(loader, converter, exporter, synthetic writer) goes through :func:`plan` and :func:`layout_tensors`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.shapes import param_shapes
from gptoss_jax.config import GptOssConfig
from gptoss_jax.layers.qkv import PARTS, fuse_qkv, split_qkv

__all__ = ["CheckpointError", "LAYOUTS", "ORIGINAL", "TRANSFORMERS", "layout_tensors", "plan", "export_items"]

TRANSFORMERS = "transformers"
ORIGINAL = "original"
LAYOUTS = (TRANSFORMERS, ORIGINAL)

# Transforms (checkpoint tensor -> our parameter):
#   copy        same array
#   qkv_in      [(nq+2nkv)*D, H] -> [H, nkv, G+2, D]   (fused q/k/v weight; rows q, then k, then v)
#   qkv_bias    [(nq+2nkv)*D]    -> [nkv, G+2, D]
#   heads_out   [H, n*D] -> [n, D, H]   (output projection)
#   transpose   [E, H]   -> [H, E]      (router)
# Layer rows (``{i}`` is the layer):
LAYER_TABLE: tuple[tuple[str, str, str, str], ...] = (
    # ours (layers.{i}.)     transformers (model.layers.{i}.)      original (block.{i}.)       transform
    ("attn_norm.scale",      "input_layernorm.weight",             "attn.norm.scale",          "copy"),
    ("attn.qkv_kernel",      "self_attn.{q,k,v}_proj.weight",      "attn.qkv.weight",          "qkv_in"),
    ("attn.qkv_bias",        "self_attn.{q,k,v}_proj.bias",        "attn.qkv.bias",            "qkv_bias"),
    ("attn.o_kernel",        "self_attn.o_proj.weight",            "attn.out.weight",          "heads_out"),
    ("attn.o_bias",          "self_attn.o_proj.bias",              "attn.out.bias",            "copy"),
    ("attn.sinks",           "self_attn.sinks",                    "attn.sinks",               "copy"),
    ("mlp_norm.scale",       "post_attention_layernorm.weight",    "mlp.norm.scale",           "copy"),
    ("mlp.router_kernel",    "mlp.router.weight",                  "mlp.gate.weight",          "transpose"),
    ("mlp.router_bias",      "mlp.router.bias",                    "mlp.gate.bias",            "copy"),
    ("mlp.gate_up_blocks",   "mlp.experts.gate_up_proj_blocks",    "mlp.mlp1_weight.blocks",   "copy"),
    ("mlp.gate_up_scales",   "mlp.experts.gate_up_proj_scales",    "mlp.mlp1_weight.scales",   "copy"),
    ("mlp.gate_up_bias",     "mlp.experts.gate_up_proj_bias",      "mlp.mlp1_bias",            "copy"),
    ("mlp.down_blocks",      "mlp.experts.down_proj_blocks",       "mlp.mlp2_weight.blocks",   "copy"),
    ("mlp.down_scales",      "mlp.experts.down_proj_scales",       "mlp.mlp2_weight.scales",   "copy"),
    ("mlp.down_bias",        "mlp.experts.down_proj_bias",         "mlp.mlp2_bias",            "copy"),
)
GLOBAL_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("embedding",            "model.embed_tokens.weight",          "embedding.weight",         "copy"),
    ("norm.scale",           "model.norm.weight",                  "norm.scale",               "copy"),
    ("unembedding",          "lm_head.weight",                     "unembedding.weight",       "copy"),
)
# transformers' dense (dequantized, e.g. community bf16) checkpoints store ``...experts.gate_up_proj``
# and ``...experts.down_proj`` (the *_blocks names without the suffix) in ``x @ W`` orientation,
# [E, in, out], which is exactly our dense kernels.
_HF_LAYER_PREFIX, _ORIG_LAYER_PREFIX = "model.layers.{i}.", "block.{i}."
PACKED_PARTS = ("blocks", "scales")
FLOAT_DTYPES = ("BF16", "F16", "F32")
BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------ transforms
def to_ours(kind: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return a
    if kind in ("heads_out", "transpose"):
        return np.ascontiguousarray(a.T).reshape(shape)
    if kind in ("qkv_in", "qkv_bias"):  # rows q, k, v -> per KV head: its query heads, its k, its v
        nkv, slots, d = shape[-3:]
        cols = np.ascontiguousarray(a.T) if kind == "qkv_in" else a  # [..., (nq + 2 nkv) * D]
        nq_d = nkv * (slots - 2) * d
        lead = cols.shape[:-1]
        q, k, v = np.split(cols, [nq_d, nq_d + nkv * d], axis=-1)
        return fuse_qkv(q.reshape(*lead, -1, d), k.reshape(*lead, nkv, d), v.reshape(*lead, nkv, d))
    raise ValueError(kind)


def to_checkpoint(kind: str, a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ours` (our parameter -> checkpoint tensor)."""
    if kind == "copy":
        return a
    if kind in ("qkv_in", "qkv_bias"):  # [..., nkv, G+2, D] -> rows q, k, v
        lead = a.shape[:-3]
        cols = np.concatenate([p.reshape(*lead, -1) for p in split_qkv(a)], axis=-1)
        return np.ascontiguousarray(cols.T) if kind == "qkv_in" else cols
    if kind == "heads_out":  # [n, D, H] -> [H, n*D]
        return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    if kind == "transpose":
        return np.ascontiguousarray(a.T)
    raise ValueError(kind)


def checkpoint_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "copy":
        return tuple(shape)
    if kind == "qkv_in":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "heads_out":
        return (shape[-1], int(np.prod(shape[:-1])))
    if kind == "transpose":
        return tuple(reversed(shape))
    if kind == "qkv_bias":
        return (int(np.prod(shape)),)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Item:
    """One parameter: its path, the checkpoint tensors it is made from, and how."""

    ours: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    build: Callable[[Sequence[np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor the layout requires: name, shape, allowed safetensors dtypes."""

    name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def rows(cfg: GptOssConfig):
    """Every (ours, transformers, original, transform) row, with the layer index filled in."""
    for ours, hf, orig, kind in GLOBAL_TABLE:
        yield ours, hf, orig, kind
    for n in range(cfg.num_hidden_layers):
        for ours, hf, orig, kind in LAYER_TABLE:
            yield (f"layers.{n}.{ours}", _HF_LAYER_PREFIX.format(i=n) + hf,
                   _ORIG_LAYER_PREFIX.format(i=n) + orig, kind)


def _qkv_rows(cfg: GptOssConfig, part: str) -> slice:
    q, kv = cfg.q_size, cfg.kv_size
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[part]


def hf_parts(cfg: GptOssConfig, hf: str, kind: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], slice]]:
    """The transformers tensors of one table row: [(name, shape, its rows of the checkpoint tensor)].
    One tensor, or for a ``{q,k,v}`` name the three whose stacked rows make the fused tensor."""
    full = checkpoint_shape(kind, shape)
    if "{q,k,v}" not in hf:
        return [(hf, full, slice(0, full[0]))]
    out = []
    for part in PARTS:
        rows_ = _qkv_rows(cfg, part)
        out.append((hf.replace("{q,k,v}", part), (rows_.stop - rows_.start, *full[1:]), rows_))
    return out


def _is_packed(name: str) -> bool:
    return name.endswith(("_blocks", "_scales", ".blocks", ".scales"))


def layout_tensors(cfg: GptOssConfig, layout: str, experts: str = "mxfp4") -> list[TensorSpec]:
    """Every tensor a checkpoint of ``layout`` holds for ``cfg``, in table order.

    ``experts``: 'mxfp4' (official, packed) or 'dense' (transformers layout only: bf16 experts).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == ORIGINAL and experts != "mxfp4":
        raise ValueError("the original/ layout always stores experts as MXFP4")
    shapes = param_shapes(cfg, "mxfp4")
    dense_shapes = param_shapes(cfg, "dense")
    out: list[TensorSpec] = []
    for ours, hf, orig, kind in rows(cfg):
        packed = _is_packed(ours)
        if layout == TRANSFORMERS:
            if packed and experts == "dense":
                if ours.endswith("_blocks"):
                    base = ours.rsplit("_", 1)[0]  # layers.N.mlp.gate_up
                    prefix = hf.rsplit(".", 1)[0]
                    proj = "gate_up_proj" if base.endswith("gate_up") else "down_proj"
                    out.append(TensorSpec(f"{prefix}.{proj}", dense_shapes[base + "_kernel"], FLOAT_DTYPES))
                continue
            out.extend(TensorSpec(name, shape, ("U8",) if packed else FLOAT_DTYPES)
                       for name, shape, _ in hf_parts(cfg, hf, kind, shapes[ours]))
        else:
            out.append(TensorSpec(orig, checkpoint_shape(kind, shapes[ours]), ("U8",) if packed else FLOAT_DTYPES))
    return out


def plan(cfg: GptOssConfig, layout: str, source_experts: str = "mxfp4", experts: str = "mxfp4") -> list[Item]:
    """How to build every parameter of a model with ``experts`` format from a ``layout`` checkpoint
    whose experts are stored as ``source_experts``. Covers each parameter exactly once."""
    shapes = param_shapes(cfg, experts)
    items: list[Item] = []
    for ours, hf, orig, kind in rows(cfg):
        is_expert_weight = any(ours.endswith(f"{p}_{q}") for p in ("gate_up", "down") for q in PACKED_PARTS)
        if is_expert_weight:
            if not ours.endswith("_blocks"):
                continue  # the *_scales row is handled together with *_blocks
            base = ours[: -len("_blocks")]
            src_blocks = hf if layout == TRANSFORMERS else orig
            src_scales = src_blocks.replace("_blocks", "_scales").replace(".blocks", ".scales")
            dense_src = hf.replace("_blocks", "") if layout == TRANSFORMERS else None
            items.extend(_expert_items(base, shapes, experts, source_experts, src_blocks, src_scales, dense_src))
            continue
        shape = shapes[ours]
        if layout == TRANSFORMERS:  # q/k/v: their rows stacked are the fused tensor
            names = tuple(name for name, _, _ in hf_parts(cfg, hf, kind, shape))
            items.append(Item(ours, shape, names, lambda a, k=kind, s=shape: to_ours(
                k, a[0] if len(a) == 1 else np.concatenate(a, axis=0), s)))
        else:
            items.append(Item(ours, shape, (orig,), lambda a, k=kind, s=shape: to_ours(k, a[0], s)))
    return items


def _expert_items(base, shapes, experts, source_experts, src_blocks, src_scales, dense_src):
    """Items for one expert weight (``base`` = layers.N.mlp.gate_up | down) across formats."""
    if source_experts == "mxfp4" and experts == "mxfp4":
        return [Item(base + "_blocks", shapes[base + "_blocks"], (src_blocks,), lambda a: a[0]),
                Item(base + "_scales", shapes[base + "_scales"], (src_scales,), lambda a: a[0])]
    if source_experts == "mxfp4":  # dequantize: [E, out, in] -> our dense [E, in, out] (exact)
        return [Item(base + "_kernel", shapes[base + "_kernel"], (src_blocks, src_scales),
                     lambda a: dequantize_experts(a[0], a[1]))]
    if experts == "dense":
        return [Item(base + "_kernel", shapes[base + "_kernel"], (dense_src,), lambda a: a[0])]
    # dense checkpoint -> packed model: quantize [E, in, out] along `in` (lossy; warned by the loader)
    quant = PairQuantizer()
    return [Item(base + "_" + part, shapes[base + "_" + part], (dense_src,), lambda a, p=part: quant(a[0], p))
            for part in PACKED_PARTS]


def dequantize_experts(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Packed ``[E, out, in/32, 16]`` + ``[E, out, in/32]`` -> dense bf16 ``[E, in, out]`` (our kernels).

    Exact: every MXFP4 value (E2M1 times a power of two) is a bf16 value. One expert at a time, so
    temporaries stay at one expert's float32 weight."""
    e, n, g, _ = blocks.shape
    out = np.empty((e, g * mxfp4.BLOCK, n), BF16)
    for j in range(e):
        out[j] = mxfp4.unpack_np(blocks[j], scales[j]).T
    return out


def quantize_experts(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``[E, in, out]`` -> packed (blocks u8 ``[E, out, in/32, 16]``, scales u8 ``[E, out, in/32]``),
    :func:`gptoss_jax.mxfp4.quantize` one expert at a time (bounded temporaries)."""
    e, k, n = kernel.shape
    bshape, sshape = mxfp4.packed_shape((e, n, k))
    blocks, scales = np.empty(bshape, np.uint8), np.empty(sshape, np.uint8)
    for j in range(e):
        blocks[j], scales[j] = mxfp4.quantize(np.asarray(kernel[j], np.float32).T, xp=np)
    return blocks, scales


class PairQuantizer:
    """Quantizes one dense expert weight once for its two packed tensors, asked for blocks then
    scales with the same array (the name table lists them as two rows)."""

    def __init__(self):
        self._dense = self._packed = None

    def __call__(self, dense: np.ndarray, part: str) -> np.ndarray:
        if self._dense is not dense:
            self._dense, self._packed = dense, quantize_experts(dense)
        out = self._packed[PACKED_PARTS.index(part)]
        if part == PACKED_PARTS[-1]:
            self._dense = self._packed = None  # the pair is done: drop the references
        return out


def export_items(cfg: GptOssConfig, experts: str = "mxfp4") -> list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]:
    """(our path, transformers name, ours->checkpoint function) for writing the transformers layout
    (MXFP4 experts), in table order. ``experts='dense'``: the model holds dense ``*_kernel`` experts,
    re-quantized with :func:`gptoss_jax.mxfp4.quantize` (both packed rows read the same kernel)."""
    out = []
    shapes = param_shapes(cfg, experts)
    for ours, hf, _orig, kind in rows(cfg):
        if experts == "dense" and _is_packed(ours):
            base, part = ours.rsplit("_", 1)
            if part == PACKED_PARTS[0]:
                quant = PairQuantizer()
            out.append((base + "_kernel", hf, lambda a, q=quant, p=part: q(a, p)))
            continue
        parts = hf_parts(cfg, hf, kind, shapes[ours])
        if len(parts) == 1:
            out.append((ours, hf, lambda a, k=kind: to_checkpoint(k, a)))
        else:  # un-fuse: each of q/k/v gets its rows of the stacked tensor
            out.extend((ours, name, lambda a, k=kind, r=r: np.ascontiguousarray(to_checkpoint(k, a)[r]))
                       for name, _, r in parts)
    return out
