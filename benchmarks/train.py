"""LoRA training step on CPU: gptoss-jax (frozen MXFP4 base, adapters on q/k/v/o and per expert on
gate_up/down) against transformers + peft (same targets via ``target_parameters``) on the same
random checkpoint, in the same run. Each side runs in its own process (peak RSS is per process).

    python benchmarks/train.py [--preset small] [--batch 4] [--seq 256] [--steps 5] [--dtype float32]

Prints tokens/s, step time and peak resident memory of each, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: A small gpt-oss (every mechanism of the real one: sinks, sliding window, YaRN, 16 experts top-4).
SMALL = dict(num_hidden_layers=4, hidden_size=512, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             num_experts=16, experts_per_token=4, vocab_size=32768, sliding_window=128,
             initial_context_length=4096, eos_token_ids=(2,), pad_token_id=0, bos_token_id=1)
RANK, ALPHA = 8, 16.0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(cfg, batch, seq, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
    return tokens[:, :-1], tokens[:, 1:]


def run_ours(ckpt, cfg, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train import lora, trainer
    from train.config import OptimizerConfig
    from train.optim import make_optimizer

    model = __import__("gptoss_jax").load(ckpt, dtype=jnp.dtype(args.dtype), experts="mxfp4")
    lora.add_lora(model, RANK, ALPHA)
    state = trainer.split(model, "lora")
    loaded = _rss_mib()
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4), 100)
    step, _, opt = trainer.compile_steps(state, tx)
    inputs, targets = _batch(cfg, args.batch, args.seq)
    b = {"tokens": inputs, "targets": targets, "mask": np.ones(inputs.shape, bool),
         "positions": np.broadcast_to(np.arange(args.seq), inputs.shape), "segment_ids": np.ones(inputs.shape, np.int32)}
    b = {k: jnp.asarray(np.asarray(v)[None]) for k, v in b.items()}
    params = state.params
    t0 = time.perf_counter()
    params, opt, m = step(params, opt, state.frozen, b, jax.random.PRNGKey(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        params, opt, m = step(params, opt, state.frozen, b, jax.random.PRNGKey(i))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    n_train = sum(int(np.prod(v.shape)) for v in params.values())
    return {"impl": "gptoss-jax", "step_s": min(times), "compile_s": compile_s, "loss": float(m["loss"]),
            "trainable": n_train, "rss_after_load_mib": loaded, "peak_rss_mib": _rss_mib()}


def run_peft(ckpt, cfg, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(os.cpu_count() or 1)
    hf_logging.set_verbosity_error()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = GptOssForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager")
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lcfg)
    model.train()
    loaded = _rss_mib()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs, targets = _batch(cfg, args.batch, args.seq)
    inputs, targets = torch.as_tensor(inputs), torch.as_tensor(targets)

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        return float(loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"impl": "transformers+peft", "step_s": min(times), "compile_s": first, "loss": loss, "trainable": n_train,
            "rss_after_load_mib": loaded, "peak_rss_mib": _rss_mib()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--worker", choices=("ours", "peft"), help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    from gptoss_jax.config import GptOssConfig

    cfg = GptOssConfig(**SMALL)
    if args.worker:
        out = (run_ours if args.worker == "ours" else run_peft)(args.checkpoint, cfg, args)
        print("RESULT " + json.dumps(out))
        return 0
    from convert.synthetic import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(os.path.join(tmp, "small"), cfg, seed=0)
        results = {}
        for worker in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--worker", worker, "--checkpoint", ckpt, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--dtype", args.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[worker] = json.loads(proc.stdout.split("RESULT ", 1)[1])
    tokens = args.batch * args.seq
    print(f"LoRA step, small preset ({json.dumps(SMALL)}), rank {RANK}, {args.dtype}, batch {args.batch} x {args.seq} "
          f"= {tokens} tokens, {os.cpu_count()} CPU cores, best of {args.steps} steps")
    print(f"{'impl':<20} {'tokens/s':>9} {'step s':>8} {'first step s':>12} {'trainable':>10} {'RSS after load MiB':>18} "
          f"{'peak RSS MiB':>12}")
    for r in results.values():
        print(f"{r['impl']:<20} {tokens / r['step_s']:>9.0f} {r['step_s']:>8.3f} {r['compile_s']:>12.2f} "
              f"{r['trainable']:>10} {r['rss_after_load_mib']:>18.0f} {r['peak_rss_mib']:>12.0f}")
    ours, peft = results["ours"], results["peft"]
    print(f"ratio gptoss-jax / transformers+peft: tokens/s x{peft['step_s'] / ours['step_s']:.2f}, "
          f"peak RSS x{ours['peak_rss_mib'] / peft['peak_rss_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
