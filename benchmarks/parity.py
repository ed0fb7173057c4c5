"""Parity report: our layers and full model against transformers' GptOss on a tiny random checkpoint.

    python benchmarks/parity.py [--preset tiny] [--seed 1] [--tokens 48]

Prints max abs errors per layer (float32, on the reference's own activations) and for the full model
(float32 and bfloat16 against the float32 reference; transformers' own bf16 run for comparison).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gptoss_jax  # noqa: E402
from convert.synthetic import write_random_checkpoint  # noqa: E402
from gptoss_jax.layers.moe import experts_forward, router  # noqa: E402
from gptoss_jax.layers.rope import rope_tables  # noqa: E402
from tests.reference import capture, load_reference, reference_logits, to_np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    cfg = gptoss_jax.PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(os.path.join(tmp, "ck"), cfg, seed=args.seed)
        ref = load_reference(path)
        ours = gptoss_jax.load(path, dtype=jnp.float32)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.tokens))
        names = []
        for i in range(cfg.num_hidden_layers):
            names += [f"model.layers.{i}.{m}" for m in
                      ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp.router", "mlp.experts")]
        with capture(ref, names) as rec:
            ref32 = reference_logits(ref, tokens)
        pos = np.broadcast_to(np.arange(args.tokens), tokens.shape)
        cos, sin = rope_tables(jnp.asarray(pos), cfg)
        print(f"preset {args.preset}, {args.batch}x{args.tokens} tokens (window {cfg.sliding_window}), float32")
        print(f"{'layer':>5} {'attn_norm':>10} {'attention':>10} {'mlp_norm':>10} {'router_w':>10} {'experts':>10}")
        for i, block in enumerate(ours.layers):
            def err(a, b):
                return float(np.abs(np.asarray(a) - to_np(b)).max())

            (x,), _, o = rec[f"model.layers.{i}.input_layernorm"]
            e_norm = err(block.attn_norm(jnp.asarray(to_np(x))), o)
            _, kw, (o, _) = rec[f"model.layers.{i}.self_attn"]
            a, _ = block.attn(jnp.asarray(to_np(kw["hidden_states"])), cos, sin, jnp.asarray(pos, jnp.int32))
            e_attn = err(a, o)
            (x,), _, o = rec[f"model.layers.{i}.post_attention_layernorm"]
            e_norm2 = err(block.mlp_norm(jnp.asarray(to_np(x))), o)
            (x,), _, (_, scores, _) = rec[f"model.layers.{i}.mlp.router"]
            w, _ = router(jnp.asarray(to_np(x)), block.mlp.router_kernel[...], block.mlp.router_bias[...], cfg.experts_per_token)
            e_router = err(w, scores)
            (x, ids, wts), _, o = rec[f"model.layers.{i}.mlp.experts"]
            y = experts_forward(jnp.asarray(to_np(x)), jnp.asarray(ids.numpy()), jnp.asarray(to_np(wts)),
                                block.mlp.expert_weights(), cfg.num_experts, cfg.swiglu_alpha, cfg.swiglu_limit)
            e_exp = err(y, o)
            print(f"{i:>5} {e_norm:>10.2e} {e_attn:>10.2e} {e_norm2:>10.2e} {e_router:>10.2e} {e_exp:>10.2e}")
        ours32 = np.asarray(ours.logits(tokens))
        ours16 = np.asarray(gptoss_jax.load(path, dtype=jnp.bfloat16).logits(tokens))
        hf16 = reference_logits(load_reference(path, torch.bfloat16), tokens)
        rms = lambda a: float(np.sqrt(np.mean((a - ref32) ** 2)))  # noqa: E731
        top1 = lambda a: float((a.argmax(-1) == ref32.argmax(-1)).mean())  # noqa: E731
        print(f"full model float32: max abs logit error {np.abs(ours32 - ref32).max():.2e} "
              f"(logits up to {np.abs(ref32).max():.2f})")
        print(f"full model bfloat16: ours max {np.abs(ours16 - ref32).max():.3f} rms {rms(ours16):.4f} "
              f"top-1 {top1(ours16):.4f} | transformers bf16 max {np.abs(hf16 - ref32).max():.3f} "
              f"rms {rms(hf16):.4f} top-1 {top1(hf16):.4f}")


if __name__ == "__main__":
    main()
