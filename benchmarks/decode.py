"""Decode benchmark.

1. ``cpu``: prefill and decode tokens/s of :class:`gptoss_jax.decode.Engine` at batch 1 and 8 on the
   ``small`` preset (real 201088 vocabulary, 4 narrow layers, 32 experts top-4), next to transformers'
   ``generate()`` on the same random checkpoint in the same run, greedy, same dtype.
2. ``cost``: XLA's cost analysis of the engine's decode step at batch 1 for the real gpt-oss-20b and
   120b shapes (abstract weights, nothing allocated): bytes accessed per token against the ideal, the
   bytes of the weights one token must read (active experts only).

    python -m benchmarks.decode                 # both parts
    python -m benchmarks.decode --part cost
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import PRESETS, GptOssConfig
from gptoss_jax.decode import Engine, SamplingParams
from gptoss_jax.decode.runner import compiler_options, empty_state, jitted
from gptoss_jax.layers.kv_cache import cache_bytes
from gptoss_jax.checkpoint.shapes import abstract_model, flat_paths

#: 4 layers of width 512 with the real vocabulary and 32 experts top-4 (~310M parameters, 206M of
#: them in the embedding and unembedding), small enough for transformers on two CPU cores.
#: ``--layers`` changes the depth (24 = gpt-oss-20b's).
SMALL = GptOssConfig(num_hidden_layers=4, hidden_size=512, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     num_experts=32, experts_per_token=4, vocab_size=201088)


def cpu_part(args) -> list[str]:
    import torch
    from transformers import GptOssForCausalLM
    from transformers.utils import logging as hf_logging

    from convert.synthetic import write_random_checkpoint
    import gptoss_jax

    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count())
    dtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}[args.dtype]
    p, n = args.prompt, args.new
    cfg = SMALL.replace(num_hidden_layers=args.layers, layer_types=None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(os.path.join(tmp, "small"), cfg, seed=0)
        hf = GptOssForCausalLM.from_pretrained(path, dtype=dtype[1]).eval()
        ours = gptoss_jax.load(path, dtype=dtype[0])  # experts stay MXFP4-packed
        for batch in args.batches:
            prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, p)).tolist()
            ids = torch.tensor(prompts)

            def hf_generate(new):
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0)
                return out[:, p:].tolist()

            # prefill token budget: every prompt of the batch in one call (as transformers runs them), up to 1024
            engine = Engine(ours, max_batch=batch, context=p + n, prefill_chunk=min(1024, batch * p))
            engine.warmup()

            def our_generate(new):
                return engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=new, stop_token_ids=()))

            runs = {"transformers": hf_generate, "gptoss-jax": our_generate}
            for gen in runs.values():
                gen(2)  # warm
            times = {(name, new): [] for name in runs for new in (1, n)}
            outs = {}
            for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
                for name, gen in runs.items():
                    for new in (1, n):
                        t = time.perf_counter()
                        outs[name] = gen(new)
                        times[name, new].append(time.perf_counter() - t)
            timings = {}
            for name in runs:
                t1, tn = min(times[name, 1]), min(times[name, n])
                timings[name] = (batch * p / t1, batch * (n - 1) / (tn - t1), outs[name])
            agree = np.mean(np.array(timings["transformers"][2]) == np.array(timings["gptoss-jax"][2]))
            hf_t, us_t = timings["transformers"], timings["gptoss-jax"]
            rows.append(f"| {batch} | {hf_t[0]:.0f} | {us_t[0]:.0f} | {us_t[0] / hf_t[0]:.1f}x | {hf_t[1]:.1f} | "
                        f"{us_t[1]:.1f} | {us_t[1] / hf_t[1]:.1f}x | {agree:.3f} |")
            print(rows[-1], flush=True)
    header = [f"small preset, {cfg.num_hidden_layers} layers ({args.dtype}, {p}-token prompts, {n} new tokens, greedy; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores; best of {args.repeats} interleaved runs; our prefill_chunk (tokens per prefill call) min(1024, batch x prompt); prefill = time to first token, decode = (time for all - time to first) / (tokens - 1))", "",
              "| batch | prefill tok/s transformers | prefill tok/s ours | ratio | decode tok/s transformers | "
              "decode tok/s ours | ratio | same tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return header + rows


def ideal_bytes(cfg: GptOssConfig, model) -> int:
    """Weight bytes one token reads: every dense weight, one embedding row, k of E experts."""
    total = 0
    for name, v in flat_paths(nnx.state(model)).items():
        nbytes = math.prod(v.shape) * jnp.dtype(v.dtype).itemsize
        if name == "embedding":
            nbytes = cfg.hidden_size * jnp.dtype(v.dtype).itemsize
        elif ".mlp." in name and not name.endswith(("router_kernel", "router_bias")):
            nbytes = nbytes * cfg.experts_per_token / cfg.num_experts
        total += nbytes
    return int(total)


def step_bytes(cfg: GptOssConfig, model, context: int) -> float:
    """XLA's bytes accessed by one compiled decode step at batch 1 (abstract weights and cache)."""
    graphdef, params = nnx.split(model)
    state = jax.eval_shape(lambda: empty_state(cfg, 1, context, jnp.bfloat16))
    _, decode = jitted("cpu")
    compiled = decode.lower("cpu", graphdef, False, context, params, state, jax.ShapeDtypeStruct((1,), bool)).compile()
    return compiled.cost_analysis()["bytes accessed"]


def _lookup():
    """The one-token embedding lookup, jitted as the decode step's compiler options compile it."""
    return jax.jit(lambda t, i: jnp.take(t, i, axis=0), compiler_options=compiler_options("cpu"))


def lookup_bytes(cfg: GptOssConfig) -> float:
    """What XLA charges the one-token embedding lookup alone (the same row read as in the step)."""
    table = jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), jnp.bfloat16)
    return _lookup().lower(table, jax.ShapeDtypeStruct((1, 1), jnp.int32)).compile().cost_analysis()["bytes accessed"]


def lookup_ms(cfg: GptOssConfig, repeats: int = 20) -> float:
    """Wall time of that lookup on a real (zero) bf16 table, mean of ``repeats``: it reads one row, not
    the table XLA:CPU's cost model charges."""
    table = jnp.zeros((cfg.vocab_size, cfg.hidden_size), jnp.bfloat16)
    f, token = _lookup(), jnp.ones((1, 1), jnp.int32)
    f(table, token).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        f(table, token).block_until_ready()
    return (time.perf_counter() - t) / repeats * 1e3


def cost_part(args) -> list[str]:
    rows = ["| model | context | bytes accessed / token (XLA) | ideal | ratio | of which the embedding lookup "
            "(XLA charge) | ratio without it |", "| --- | --- | --- | --- | --- | --- | --- |"]
    charged = {}
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        cfg = PRESETS[name]
        model = abstract_model(cfg, jnp.bfloat16, "mxfp4")
        ideal = ideal_bytes(cfg, model)
        lookup = charged[name] = lookup_bytes(cfg)
        for context in args.contexts:
            t = time.perf_counter()
            total = step_bytes(cfg, model, context)
            print(f"{name} context {context}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
            rows.append(f"| {name} | {context} | {total / 1e9:.3f} GB | {ideal / 1e9:.3f} GB | {total / ideal:.2f}x | "
                        f"{lookup / 1e9:.3f} GB | {(total - lookup + cfg.hidden_size * 2) / ideal:.2f}x |")
            print(rows[-1], flush=True)
    rows += ["", f"The embedding lookup XLA charges {charged['gpt-oss-20b'] / 1e9:.3f} GB runs in "
                 f"{lookup_ms(PRESETS['gpt-oss-20b']):.2f} ms "
                 "on this machine (a one-row read; the charge is the cost model's, not the run's)."]
    rows += ["", "| model | KV cache at 131072 positions, batch 1 (bf16) | every layer full-length | ratio |",
             "| --- | --- | --- | --- |"]
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        cfg = PRESETS[name]
        ring = cache_bytes(cfg, 1, 131072)
        full = cache_bytes(cfg.replace(layer_types=("full_attention",) * cfg.num_hidden_layers), 1, 131072)
        rows.append(f"| {name} | {ring / 2**30:.2f} GiB ({ring:,} B) | {full / 2**30:.2f} GiB | {ring / full:.3f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["cpu", "cost", "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--layers", type=int, default=SMALL.num_hidden_layers, help="depth of the small preset")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--new", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 4096])
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    out = []
    if args.part in ("cpu", "all"):
        out += cpu_part(args) + [""]
    if args.part in ("cost", "all"):
        out += cost_part(args)
    print("\n".join(out))


if __name__ == "__main__":
    main()
