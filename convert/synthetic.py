"""Random-weight checkpoints in the official layouts (tests, the embedded demo, benchmarks).

Values are a function of (seed, transformers tensor name) only, so the same seed gives the same model
in the transformers and the original/ layouts (original's qkv = rows of q, k, v). Tensors are
generated and written one at a time, so a full-size 20b-shaped checkpoint needs little memory.
Scales are chosen so activations stay O(1) and the experts' gate/up outputs reach the SwiGLU clamp.
"""
from __future__ import annotations

import math
import os
import zlib

import numpy as np

from convert.shards import write_json, write_shards
from gptoss_jax.checkpoint.names import BF16, ORIGINAL, TRANSFORMERS, hf_parts, layout_tensors, rows
from gptoss_jax.checkpoint.shapes import param_shapes
from gptoss_jax.config import GptOssConfig

HARMONY_STOPS = [200002, 199999, 200012]  # generation_config.json eos of the published models


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_tensor(cfg: GptOssConfig, name: str, shape: tuple[int, ...], seed: int,
                  lm_head_alignment: float = 0.0) -> np.ndarray:
    """The value of transformers-named tensor ``name`` (bf16, or u8 for MXFP4 parts).

    ``lm_head_alignment`` > 0 adds that multiple of the (normalised) embedding to the lm_head, giving
    confident, trained-like logit margins (the top-1 is then mostly the current token).
    """
    rng = _rng(seed, name)
    if name.endswith("_blocks"):
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if name.endswith("_scales"):
        fan_in = shape[-1] * 32
        # E2M1 codes drawn uniformly have std ~3.1; aim at std 1/sqrt(fan_in), gate_up 4x wider.
        target = 1 / math.sqrt(fan_in) * (4 if "gate_up" in name else 1 / 16)
        base = 127 + round(math.log2(target / 3.1))
        return (base + rng.integers(-1, 2, shape)).astype(np.uint8)

    def normal(std, mean=0.0):
        out = np.empty(shape, BF16)
        flat = out.reshape(-1)
        step = 1 << 24  # bounded temporaries for embedding-sized tensors
        for i in range(0, flat.size, step):
            n = min(step, flat.size - i)
            flat[i:i + n] = (mean + std * rng.standard_normal(n, dtype=np.float32)).astype(BF16)
        return out

    if name.endswith(("layernorm.weight", "norm.weight")):
        return normal(0.1, 1.0)
    if name.endswith("sinks"):
        return normal(1.5)
    if name.endswith(("gate_up_proj", "down_proj")):  # dense experts [E, in, out]
        return normal(1 / math.sqrt(shape[1]) * (4 if "gate_up" in name else 1 / 16))
    if name.endswith("bias"):
        return normal(0.1)
    if name.endswith("router.weight"):  # decisive routing, like a trained router
        return normal(4 / math.sqrt(shape[-1]))
    if name == "model.embed_tokens.weight":
        return normal(1.0)
    if name == "lm_head.weight" and lm_head_alignment:
        emb = random_tensor(cfg, "model.embed_tokens.weight", shape, seed).astype(np.float32)
        head = normal(1 / math.sqrt(shape[-1])).astype(np.float32)
        return (head + lm_head_alignment * emb / math.sqrt(shape[-1])).astype(BF16)
    if name.endswith("o_proj.weight"):
        return normal(0.3 / math.sqrt(shape[-1]))
    return normal(1 / math.sqrt(shape[-1]))  # [out, in] linear weights


def original_tensor(cfg: GptOssConfig, name: str, shape: tuple[int, ...], seed: int,
                    lm_head_alignment: float = 0.0) -> np.ndarray:
    """An original/ tensor built from the transformers-named values (same seed, same model)."""
    shapes = param_shapes(cfg, "mxfp4")
    parts = []
    for ours, hf, orig, kind in rows(cfg):
        if orig == name:  # the q/k/v row stands for three transformers tensors, stacked in order
            parts.extend(random_tensor(cfg, part, part_shape, seed, lm_head_alignment)
                         for part, part_shape, _ in hf_parts(cfg, hf, kind, shapes[ours]))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    assert out.shape == tuple(shape), (name, out.shape, shape)
    return out


def write_random_checkpoint(path: str | os.PathLike, cfg: GptOssConfig, *, layout: str = TRANSFORMERS,
                            experts: str = "mxfp4", seed: int = 0, max_shard_bytes: int | None = None,
                            lm_head_alignment: float = 0.0, progress=None) -> str:
    """Write a random ``cfg`` checkpoint at ``path`` in ``layout``; returns ``path``.

    transformers: config.json, generation_config.json, model.safetensors (or 0-based shards
    ``model-0000k-of-0000N.safetensors`` + index when ``max_shard_bytes`` splits it);
    original: config.json, dtypes.json, model.safetensors. ``progress(nbytes)`` is called per tensor.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    entries = [(s.name, "U8" if "U8" in s.dtypes else "BF16", s.shape) for s in layout_tensors(cfg, layout, experts)]

    def values():
        make = random_tensor if layout == TRANSFORMERS else original_tensor
        for name, dt, shape in entries:
            a = make(cfg, name, shape, seed, lm_head_alignment)
            if progress:
                progress(a.nbytes)
            yield name, a

    write_shards(path, entries, values(), max_shard_bytes=max_shard_bytes)
    if layout == TRANSFORMERS:
        write_json(os.path.join(path, "config.json"), cfg.to_hf_dict(quantized=experts == "mxfp4"))
        write_json(os.path.join(path, "generation_config.json"),
                   {"bos_token_id": cfg.bos_token_id, "do_sample": True, "eos_token_id": HARMONY_STOPS if cfg.vocab_size == 201088 else list(cfg.eos_token_ids),
                    "pad_token_id": cfg.pad_token_id})
    elif layout == ORIGINAL:
        write_json(os.path.join(path, "config.json"), cfg.to_original_dict())
        write_json(os.path.join(path, "dtypes.json"),
                   {n: "FP4" if n.endswith(".blocks") else "UE8" if n.endswith(".scales") else "BF16"
                    for n, *_ in entries})
    return path
