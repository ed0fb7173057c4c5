"""Accelerator programs compiled on this machine (deviceless AOT): memory, bytes moved, kernels.

Compiles the real programs with abstract weights (``ShapeDtypeStruct`` placed on the target device,
nothing allocated) for ``--target cpu|h100|h200|v5p`` and prints one JSON object per program:

- ``decode``: the engine's decode step (:func:`gptoss_jax.decode.runner.jitted`), ``--batch`` slots
  of ``--context`` positions, ``--tokens`` positions already cached (default context - 1), compiled
  for the length bucket the engine runs then (:func:`gptoss_jax.decode.runner.decode_bucket` of
  tokens + 1 slots in the default buckets: powers of two from 1024, and the context; row field
  ``kv_len``): full-attention layers read those slots of the context-sized cache;
- ``prefill``: the engine's prefill call on ``--batch`` rows of ``--tokens`` prompt tokens each;
- ``train_step``: :func:`train.step.make_train_step` (LoRA rank 8 on the packed base, AdamW), one
  micro-batch of ``--batch`` x ``--tokens`` tokens.

Fields: ``temp_bytes``, ``argument_bytes``, ``output_bytes``, ``alias_bytes``, ``peak_bytes``
(``memory_analysis()``; the peak is XLA's own ``peak_memory_in_bytes`` where it gives one, else
argument + output - alias + temp); ``hbm_bytes``: bytes moved by one call: ``cost_analysis()['bytes
accessed']`` on CPU; on TPU the HBM traffic summed from the optimized HLO (``hbm_source`` 'hlo_hbm':
arrays in memory space 0 only, see :mod:`benchmarks.hlo_traffic`: XLA:TPU prefetches weights into VMEM,
``S(1)``, and ``cost_analysis()`` charges both the prefetch and the fused product's read of the VMEM copy;
it stays in ``cost_analysis_bytes``); on GPU ``hlo_bytes``. ``hlo_bytes`` and ``kernels`` always come
from the optimized HLO (:mod:`benchmarks.hlo_traffic`: operands + outputs of each launched kernel, any
memory space, loops times their trip count); ``ideal_bytes`` (:func:`ideal_bytes`) and ``ratio`` =
hbm / ideal.

Parameters are the abstract model's in the layout the loader gives them on the target's devices
(:func:`gptoss_jax.layers.moe.layout_for`: packed experts in the TPU layout on v5p).

Plugins are never installed here: for h100/h200 the CUDA plugin and for v5p libtpu must be importable
(``PYTHONPATH=/tmp/cudaplug:/tmp/tpuplug``; both can be on the path of one process).

    PYTHONPATH=.:/tmp/cudaplug python -m benchmarks.aot --target h100 --model gpt-oss-20b --part decode --batch 1 64
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time

#: gptoss_jax.config.ATTENTION_IMPLS (not imported here: this module is imported before jax is configured).
ATTENTION_IMPLS = ("auto", "xla", "blocked", "pallas")
PLUGINS = {
    "cuda": ("jax_plugins.xla_cuda12", "pip install --target /tmp/cudaplug --no-deps jax-cuda12-plugin==0.10.2 "
             "jax-cuda12-pjrt==0.10.2, then PYTHONPATH=/tmp/cudaplug"),
    "tpu": ("libtpu", 'pip install --target /tmp/tpuplug --no-deps "libtpu==0.0.42.*", then PYTHONPATH=/tmp/tpuplug'),
}
TARGETS = ("cpu", "h100", "h200", "v5p")
PARTS = ("decode", "prefill", "train_step")
_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_targets")
#: Environment libtpu needs to describe a TPU topology on a machine without one.
_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-4"}


class PluginMissing(RuntimeError):
    """The PJRT plugin a target needs is not importable; the message names the command."""


def require_plugin(target: str) -> None:
    """Raise :class:`PluginMissing` unless the plugin ``target`` compiles with is importable."""
    kind = {"h100": "cuda", "h200": "cuda", "v5p": "tpu"}.get(target)
    if kind is None:
        return
    module, command = PLUGINS[kind]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise PluginMissing(f"--target {target} needs the {kind} PJRT plugin ({module} is not importable): {command}")


def target_device(target: str):
    """The device programs for ``target`` are compiled for (a deviceless topology's first chip)."""
    import jax
    from jax.experimental import topologies

    require_plugin(target)
    if target == "cpu":
        return jax.devices("cpu")[0]
    if target in ("h100", "h200"):
        with open(os.path.join(_TARGET_DIR, f"{target}.txtpb")) as f:
            config = f.read()
        return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=config).devices[0]
    for k, v in _TPU_ENV.items():
        os.environ.setdefault(k, v)
    return topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]


# ------------------------------------------------------------------------------------------ ideal
def distinct_experts(num_experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts ``tokens`` tokens select with top-``k`` of ``num_experts`` under
    uniform random routing: ``E * (1 - (1 - k/E)^N)``."""
    return num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)


def weight_bytes(cfg, experts_read: float, embedding_rows: int) -> int:
    """Weights one call must read (bf16 dense weights, packed MXFP4 experts, from the abstract model's
    own parameters): every dense weight (attention, norms, router, unembedding) in full,
    ``embedding_rows`` rows of the embedding, and per layer ``experts_read`` of its E experts (blocks,
    scales and biases)."""
    dense, experts, embedding = _parameter_bytes(cfg)
    return int(dense + experts * experts_read / cfg.num_experts + embedding * embedding_rows / cfg.vocab_size)


@functools.cache
def _parameter_bytes(cfg) -> tuple[int, int, int]:
    """(dense weights, all experts, the embedding) bytes of the bf16 / MXFP4 model."""
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.checkpoint.shapes import abstract_model, flat_paths

    totals = [0, 0, 0]
    for name, v in flat_paths(nnx.state(abstract_model(cfg, jnp.bfloat16, "mxfp4"))).items():
        nbytes = math.prod(v.shape) * jnp.dtype(v.dtype).itemsize
        expert = ".mlp." in name and not name.endswith(("router_kernel", "router_bias"))
        totals[2 if name == "embedding" else 1 if expert else 0] += nbytes
    return tuple(totals)


def activation_bytes(cfg, tokens: int, logit_rows: int, dtype_bytes: int = 2) -> int:
    """Activations written once and read once: per layer and token the two normed inputs, the two
    residual sums, q/k/v, the attention output, and for each of the k selected experts its gate_up
    output, SwiGLU output and down output; plus float32 logits of ``logit_rows`` rows."""
    h, i, k = cfg.hidden_size, cfg.intermediate_size, cfg.experts_per_token
    per_token_layer = 4 * h + 2 * cfg.q_size + 2 * cfg.kv_size + k * (2 * i + i + h)
    return int(2 * (cfg.num_hidden_layers * tokens * per_token_layer * dtype_bytes + logit_rows * cfg.vocab_size * 4))


def kv_bytes(cfg, batch: int, positions: int, context: int, dtype_bytes: int = 2) -> int:
    """k and v of ``positions`` positions per row that one step reads: sliding layers min(positions,
    window) slots, full layers ``positions`` (at most the context)."""
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    positions = min(positions, context)
    return sum(batch * per_slot * (min(positions, cfg.window(l)) if cfg.window(l) else positions)
               for l in range(cfg.num_hidden_layers))


def ideal_bytes(cfg, part: str, batch: int, tokens: int, context: int, trainable: int = 0) -> dict:
    """Bytes one call must move at the least, by component (bf16 activations, KV and dense weights).

    decode (N = batch tokens, ``tokens`` already cached per row):
        weights(E (1 - (1 - k/E)^N) experts per layer, N embedding rows)
        + KV read of min(tokens + 1, context) positions (:func:`kv_bytes`) + KV write of 1 position
        + activations(N tokens, N logit rows)
    prefill (N = batch x tokens prompt tokens, empty cache):
        weights(E (1 - (1 - k/E)^N) experts, N rows) + KV write of min(tokens, slots) positions per row
        + activations(N tokens, batch logit rows)
    train_step (N = batch x tokens): weights read twice (forward and backward; no rematerialization
        charged) + activations(N, N) x 2 (forward writes, backward reads; gradients of activations as
        much again) + the ``trainable`` parameters (float32): gradient written and read, AdamW m and v
        read and written, the parameter read and written: 8 x 4 bytes each.
    Positions arrays of the cache (int32 per slot) and the sampler's own work are not charged.
    """
    n = batch * tokens if part in ("prefill", "train_step") else batch
    experts = distinct_experts(cfg.num_experts, cfg.experts_per_token, n)
    w = weight_bytes(cfg, experts, min(n, cfg.vocab_size))
    if part == "decode":
        parts = {"weights": w, "kv": kv_bytes(cfg, batch, tokens + 1, context) + kv_bytes(cfg, batch, 1, context),
                 "activations": activation_bytes(cfg, n, n)}
    elif part == "prefill":
        parts = {"weights": w, "kv": kv_bytes(cfg, batch, tokens, context), "activations": activation_bytes(cfg, n, batch)}
    else:
        parts = {"weights": 2 * w, "kv": 0, "activations": 2 * activation_bytes(cfg, n, n),
                 "optimizer": 8 * 4 * trainable}
    parts["total"] = sum(parts.values())
    return parts


# -------------------------------------------------------------------------------------- programs
@dataclasses.dataclass
class Program:
    """A jitted function and abstract arguments to lower it with."""

    fn: object
    args: tuple
    trainable: int = 0


def _model(cfg, attention: str = "auto", platform: str = "cpu"):
    """The abstract bf16 / MXFP4 model with every attention layer on ``attention`` (ATTENTION_IMPLS), its
    experts in the layout :func:`gptoss_jax.checkpoint.loader.load` gives them on ``platform``."""
    import jax.numpy as jnp

    from gptoss_jax.checkpoint.shapes import abstract_model
    from gptoss_jax.layers.attention import set_attention
    from gptoss_jax.layers.moe import layout_for, set_expert_layout

    model = set_expert_layout(abstract_model(cfg, jnp.bfloat16, "mxfp4"), layout_for(platform))
    set_attention(model, attention)
    return model


def _placed(tree, device):
    import jax

    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def decode_kv_len(context: int, tokens: int) -> int:
    """The length bucket the engine's decode step runs with ``tokens`` positions cached (it writes
    position ``tokens``: tokens + 1 slots), in the engine's default buckets."""
    from gptoss_jax.decode.runner import decode_bucket, decode_buckets

    return decode_bucket(tokens + 1, decode_buckets(context))


def decode_program(cfg, device, batch: int, context: int, attention: str = "auto", kv_len: int | None = None) -> Program:
    """The decode step for ``kv_len`` (default: the context) slots of the full layers' cache."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax import platform
    from gptoss_jax.decode.runner import empty_state, jitted

    target = platform.of(device)
    graphdef, params = nnx.split(_model(cfg, attention, target))
    state = jax.eval_shape(lambda: empty_state(cfg, batch, context, jnp.bfloat16))
    active = jax.ShapeDtypeStruct((batch,), bool)
    kv_len = context if kv_len is None else kv_len
    return Program(jitted(target)[1], (target, graphdef, False, kv_len, *_placed((params, state, active), device)))


def prefill_program(cfg, device, batch: int, context: int, tokens: int, attention: str = "auto") -> Program:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax import platform
    from gptoss_jax.decode.runner import empty_state, jitted
    from gptoss_jax.decode.sampling import SlotBias, SlotSampling

    target = platform.of(device)
    graphdef, params = nnx.split(_model(cfg, attention, target))
    state = jax.eval_shape(lambda: empty_state(cfg, batch, context, jnp.bfloat16))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    sampling = jax.eval_shape(lambda: SlotSampling.empty(batch))
    bias = jax.eval_shape(lambda: SlotBias.empty(batch))
    rest = (state, i32(batch), i32(batch, tokens), i32(batch, tokens), i32(batch), sampling, bias, None)
    return Program(jitted(target)[0], (target, graphdef, False, *_placed((params, *rest), device)))


def train_program(cfg, device, batch: int, tokens: int, rank: int = 8, attention: str = "auto") -> Program:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax import platform
    from gptoss_jax.layers.attention import set_attention
    from gptoss_jax.layers.moe import layout_for, set_expert_layout
    from gptoss_jax.model import GptOss
    from train import lora
    from train.config import OptimizerConfig
    from train.optim import make_optimizer
    from train.step import make_train_step, to_tree

    model = nnx.eval_shape(lambda: lora.add_lora(GptOss(cfg, dtype=jnp.bfloat16, experts="mxfp4", rngs=nnx.Rngs(0)),
                                                 rank, 2.0 * rank))
    set_attention(model, attention)
    set_expert_layout(model, layout_for(platform.of(device)))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    params = to_tree(trainable)
    tx = make_optimizer(OptimizerConfig(), 1000)
    opt_state = jax.eval_shape(tx.init, params)
    shape = (1, batch, tokens)
    batch_arrays = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
                    "mask": jax.ShapeDtypeStruct(shape, bool), "positions": jax.ShapeDtypeStruct(shape, jnp.int32),
                    "segment_ids": jax.ShapeDtypeStruct(shape, jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(graphdef, template, tx), donate_argnums=(0, 1))
    n = sum(math.prod(v.shape) for v in params.values())
    return Program(step, _placed((params, opt_state, frozen, batch_arrays, key), device), n)


# ------------------------------------------------------------------------------------------- run
def measure(target: str, model: str, part: str, batch: int, context: int, tokens: int | None = None,
            device=None, dump: str | None = None, attention: str = "auto") -> dict:
    """Compile one program for ``target`` and return its JSON row (fields in the module docstring);
    ``attention``: the attention implementation of every layer (ATTENTION_IMPLS)."""
    from benchmarks.hlo_traffic import traffic
    from gptoss_jax import platform
    from gptoss_jax.config import get_preset

    cfg = get_preset(model)
    device = device if device is not None else target_device(target)
    if tokens is None:
        tokens = context - 1 if part == "decode" else min(context, 128)
    kv_len = None
    if part == "decode":
        kv_len = decode_kv_len(context, tokens)
        prog = decode_program(cfg, device, batch, context, attention, kv_len)
    elif part == "prefill":
        prog = prefill_program(cfg, device, batch, max(context, tokens), tokens, attention)
    elif part == "train_step":
        prog = train_program(cfg, device, batch, tokens, attention=attention)
    else:
        raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
    t0 = time.perf_counter()
    compiled = prog.fn.lower(*prog.args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    t = traffic(text)
    tpu = platform.of(device) == "tpu"
    t_hbm = traffic(text, memory_space=0) if tpu else None
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, f"{target}_{model}_{part}_b{batch}_c{context}_t{tokens}_{attention}.hlo"),
                  "w") as f:
            f.write(text)
    peak = getattr(mem, "peak_memory_in_bytes", 0) or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    cost_bytes = cost.get("bytes accessed") if cost else None
    hbm, source = (t_hbm.bytes, "hlo_hbm") if tpu else (cost_bytes, "cost_analysis") if cost_bytes is not None \
        else (t.bytes, "hlo")
    ideal = ideal_bytes(cfg, part, batch, tokens, context, prog.trainable)
    row = {"target": target, "model": model, "part": part, "batch": batch, "context": context, "tokens": tokens,
           "attention": attention, "kv_len": kv_len,
           "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
           "output_bytes": mem.output_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes, "peak_bytes": int(peak),
           "hbm_bytes": int(hbm), "hbm_source": source,
           "cost_analysis_bytes": None if cost_bytes is None else int(cost_bytes), "hlo_bytes": t.bytes, "ideal_bytes": ideal["total"], "ideal": ideal,
           "kernels": t.kernels, "unknown_trip_loops": t.unknown_loops, "compile_s": round(seconds, 1)}
    row["ratio"] = round(row["hbm_bytes"] / ideal["total"], 3)
    row["top_kernels"] = dict(sorted((t_hbm or t).by_kernel.items(), key=lambda kv: -kv[1])[:8])
    return row


def _table_row(r: dict) -> str:
    gb = lambda x: f"{x / 1e9:.3f}"  # noqa: E731
    return (f"| {r['target']} | {r['model']} | {r['part']} | {r['batch']} | {r['context']} | {r['tokens']} | "
            f"{gb(r['hbm_bytes'])} ({r['hbm_source']}) | {gb(r['hlo_bytes'])} | {gb(r['ideal_bytes'])} | "
            f"{r['ratio']:.2f}x | {r['kernels']} | {gb(r['peak_bytes'])} |")


TABLE_HEADER = ("| target | model | part | batch | context | tokens | hbm GB | hlo GB | ideal GB | ratio | kernels | "
                "peak GB |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="h100")
    p.add_argument("--model", default="gpt-oss-20b", help="gpt-oss-20b, gpt-oss-120b or a tiny preset name")
    p.add_argument("--part", choices=PARTS, nargs="+", default=["decode"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, default=4096, help="cache positions per slot")
    p.add_argument("--tokens", type=int, default=None,
                   help="decode: positions already cached (default context - 1); prefill/train_step: prompt "
                        "/ sequence length (default min(context, 128))")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="auto",
                   help="attention implementation of every layer (see gptoss_jax.layers.attention.attention_path)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (default: a markdown table)")
    p.add_argument("--dump", metavar="DIR", help="also write each program's optimized HLO text into DIR")
    args = p.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")  # the target is a topology, not this process's backend
    try:
        device = target_device(args.target)
    except PluginMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(TABLE_HEADER)
    for part in args.part:
        for batch in args.batch:
            row = measure(args.target, args.model, part, batch, args.context, args.tokens, device, args.dump,
                          args.attention)
            print(json.dumps(row) if args.json else _table_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
