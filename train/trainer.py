"""The training run: load the base, attach adapters (lora) or train every weight (full), stream packed
batches, step, log, evaluate, checkpoint, resume.

lora: the base is loaded with MXFP4-packed experts and stays frozen; only ``nnx.LoRAParam``
variables get gradients and AdamW state. full: every weight in ``dtype`` with dense experts, AdamW
moments in float32. With a mesh, parameters, optimizer state and batches are sharded (parameters by
their logical axes and ``RULES``, batches over the ``data`` axis).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import gptoss_jax
from gptoss_jax.sharding import get_rules, mesh_from_spec, state_shardings
from train import data as data_lib
from train import lora
from train.checkpointing import Checkpoints
from train.config import TrainConfig
from train.mesh import batch_sharding
from train.metrics import MetricsLog, plot_loss
from train.optim import make_optimizer, schedule
from train.merge import merge_checkpoint
from train.step import BATCH_FIELDS, make_eval_step, make_train_step, to_tree

log = logging.getLogger("train")

#: sharding rule preset per mode: lora keeps the frozen base expert/tensor parallel; full SFT also
#: splits the weights (and so their AdamW moments) over the data axis
RULES = {"lora": "expert_tensor", "full": "fsdp"}


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message says why and what is on disk."""


@dataclasses.dataclass
class Trainable:
    """A model split for training: ``params`` (flat dict, trainable) and ``frozen`` (nnx State)."""

    graphdef: object
    template: object  # the trainable nnx State as ShapeDtypeStructs (structure only)
    params: dict
    frozen: object
    shardings: dict | None  # params' NamedShardings (flat dict) with a mesh


def build_model(cfg: TrainConfig, mesh=None) -> gptoss_jax.GptOss:
    """The base model as the mode needs it (lora: packed experts + adapters; full: dense experts)."""
    dtype = jnp.dtype(cfg.dtype)
    experts = "mxfp4" if cfg.mode == "lora" else "dense"
    model = gptoss_jax.load(cfg.checkpoint, dtype=dtype, experts=experts, mesh=mesh, rules=RULES[cfg.mode])
    if cfg.mode == "lora":
        lo = cfg.lora
        lora.add_lora(model, lo.rank, lo.alpha, lo.dropout, tuple(lo.targets), seed=cfg.seed)
    return model


def split(model: gptoss_jax.GptOss, mode: str, mesh=None) -> Trainable:
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam if mode == "lora" else nnx.Param, ...)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    params = to_tree(trainable)
    shardings = None
    if mesh is not None:
        shardings = to_tree(state_shardings(trainable, mesh, get_rules(RULES[mode])))
        params = jax.device_put(params, shardings)
    return Trainable(graphdef, template, params, frozen, shardings)


def opt_state_shardings(tx, params: dict, shardings: dict | None, mesh):
    """Optimizer-state shardings for flat param dicts: moments follow their parameter's sharding,
    scalars (step counts) are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, abstract, shardings,
                                 transform_non_params=lambda _: replicated)


def compile_steps(state: Trainable, tx, mesh=None):
    """-> (jitted train step, jitted eval step, initial optimizer state), sharded over ``mesh`` if given."""
    step_fn = make_train_step(state.graphdef, state.template, tx)
    eval_fn = make_eval_step(state.graphdef, state.template)
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=(0, 1)), jax.jit(eval_fn), jax.jit(tx.init)(state.params)
    opt_sh = opt_state_shardings(tx, state.params, state.shardings, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(step_fn, out_shardings=(state.shardings, opt_sh, replicated), donate_argnums=(0, 1))
    return step_fn, jax.jit(eval_fn, out_shardings=replicated), jax.jit(tx.init, out_shardings=opt_sh)(state.params)


def _stack(rows: dict, grad_accum: int, batch_size: int) -> dict:
    """[A*B, T] fields -> [A, B, T]."""
    return {f: rows[f].reshape(grad_accum, batch_size, -1) for f in BATCH_FIELDS}


@dataclasses.dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: TrainConfig
    out: str
    mesh: jax.sharding.Mesh | None
    state: Trainable
    step_fn: object
    eval_fn: object
    params: dict
    opt_state: object
    stream: data_lib.Stream
    eval_rows: dict | None
    ckpts: Checkpoints
    metrics: MetricsLog
    key: jax.Array
    start: int = 0
    last_saved: int | None = None


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict. See the module docstring."""
    run = setup(cfg)
    progress = _progress(cfg.steps, run.start)
    try:
        for step in range(run.start + 1, cfg.steps + 1):
            progress.update(train_step(run, step))
            if run.eval_rows is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
                evaluate(run, step)
            if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                run.ckpts.save(step, run.params, run.opt_state, checkpoint_meta(run, step))
                run.last_saved = step
        if run.eval_rows is not None and not (cfg.eval_interval and cfg.steps % cfg.eval_interval == 0) \
                and run.start < cfg.steps:
            evaluate(run, cfg.steps)
        run.ckpts.wait()
    finally:
        progress.close()
        run.ckpts.close()
    return finish(run)


def setup(cfg: TrainConfig) -> Run:
    """Output folder, mesh, base model (+ adapters), data, compiled steps; resumed from the latest checkpoint."""
    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    mesh = make_mesh(cfg)
    enc = data_lib.harmony_encoding(cfg.data.encodings_dir)
    log.info("loading %s for %s training (%s)", cfg.checkpoint, cfg.mode, cfg.dtype)
    model = build_model(cfg, mesh)
    samples, eval_rows = load_data(cfg, enc, model.config.vocab_size)
    state = split(model, cfg.mode, mesh)
    del model
    n_train = sum(int(np.prod(v.shape)) for v in state.params.values())
    log.info("%d trainable parameters (%s)", n_train, "adapters" if cfg.mode == "lora" else "all weights")
    tx = make_optimizer(cfg.optimizer, cfg.steps)
    step_fn, eval_fn, opt_state = compile_steps(state, tx, mesh)
    stream = data_lib.Stream(samples, cfg.data.sequence_length, packing=cfg.data.packing, shuffle=cfg.data.shuffle,
                             seed=cfg.seed)
    run = Run(cfg, out, mesh, state, step_fn, eval_fn, state.params, opt_state, stream, eval_rows,
              Checkpoints(os.path.join(out, "checkpoints"), cfg.keep_checkpoints),
              MetricsLog(os.path.join(out, "metrics.jsonl")), jax.random.PRNGKey(cfg.seed))
    resume(run)
    return run


def make_mesh(cfg: TrainConfig) -> jax.sharding.Mesh | None:
    try:
        mesh = mesh_from_spec(cfg.mesh) if cfg.mesh else None
    except ValueError as e:
        raise TrainingError(f"field 'mesh': {e}") from None
    if mesh is not None and cfg.batch_size % mesh.shape.get("data", 1):
        raise TrainingError(f"field 'batch_size' ({cfg.batch_size}) must be a multiple of the mesh's data axis "
                            f"({mesh.shape['data']})")
    return mesh


def load_data(cfg: TrainConfig, enc, vocab: int) -> tuple[list[data_lib.Sample], dict | None]:
    """Training samples and packed evaluation rows (None without eval files)."""
    d = cfg.data

    def samples(paths):
        return data_lib.load_samples(paths, enc, include_analysis=d.include_analysis, sequence_length=d.sequence_length,
                                     vocab_size=vocab, date=d.date or None)

    train_samples = samples(d.train)
    eval_rows = data_lib.pack(samples(d.eval), d.sequence_length, d.packing) if d.eval else None
    log.info("%d training samples from %s", len(train_samples), ", ".join(d.train))
    return train_samples, eval_rows


def resume(run: Run) -> None:
    """Continue from the latest checkpoint when there is one (params, optimizer, data position, key)."""
    start = run.ckpts.latest_step() or 0
    if not start:
        if os.path.exists(run.metrics.path):
            os.remove(run.metrics.path)
        return
    run.params, run.opt_state, meta = run.ckpts.restore(start, run.params, run.opt_state)
    run.stream.position = data_lib.Position(**meta["data"])
    run.key = jnp.asarray(meta["rng"], jnp.uint32)
    run.metrics.truncate_after(start)
    run.start = run.last_saved = start
    log.info("resuming from step %d (epoch %d, row %d) in %s", start, run.stream.position.epoch,
             run.stream.position.row, run.ckpts.directory)


def train_step(run: Run, step: int) -> dict:
    """One optimizer step on the next batch; its metrics record (written and logged)."""
    cfg = run.cfg
    batch = _stack(run.stream.take(cfg.batch_size * cfg.grad_accum), cfg.grad_accum, cfg.batch_size)
    tokens = int((batch["positions"] >= 0).sum())
    t0 = time.perf_counter()
    run.params, run.opt_state, m = run.step_fn(run.params, run.opt_state, run.state.frozen,
                                               jax.device_put(batch, batch_sharding(run.mesh, 3, 1)),
                                               jax.random.fold_in(run.key, step))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    dt = time.perf_counter() - t0
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
        run.ckpts.wait()
        where = f"step {run.last_saved} in {run.ckpts.directory}" if run.last_saved else "none (no checkpoint yet)"
        raise TrainingError(f"step {step}: loss is {m['loss']} (gradient norm {m['grad_norm']}); stopping. "
                            f"Nothing was saved for this step; the last good checkpoint is {where}. "
                            f"Lower optimizer.learning_rate or check the data.")
    record = {"step": step, "loss": m["loss"], "lr": float(schedule(cfg.optimizer, cfg.steps)(step - 1)),
              "grad_norm": m["grad_norm"], "tokens": tokens, "loss_tokens": int(m["loss_tokens"]),
              "tokens_per_s": tokens / dt, "step_time_s": dt}
    run.metrics.write(record)
    if step % cfg.log_interval == 0 or step == run.start + 1:
        log.info("step %d/%d: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s", step, cfg.steps,
                 m["loss"], record["lr"], m["grad_norm"], record["tokens_per_s"])
    return record


def evaluate(run: Run, step: int) -> None:
    total = count = 0.0
    for b in data_lib.batches(run.eval_rows, run.cfg.batch_size):
        s, c = run.eval_fn(run.params, run.state.frozen, jax.device_put(b, batch_sharding(run.mesh, 2, 0)))
        total, count = total + float(s), count + float(c)
    record = {"step": step, "eval_loss": total / max(count, 1.0), "eval_tokens": int(count)}
    run.metrics.write(record)
    log.info("step %d: eval loss %.4f over %d tokens", step, record["eval_loss"], record["eval_tokens"])


def checkpoint_meta(run: Run, step: int) -> dict:
    """What a checkpoint records besides params and optimizer: data position, key, the base and mode."""
    cfg = run.cfg
    return {"step": step, "data": dataclasses.asdict(run.stream.position), "rng": np.asarray(run.key).tolist(),
            "base": {"checkpoint": os.path.abspath(cfg.checkpoint), "mode": cfg.mode, "dtype": cfg.dtype,
                     "lora": dataclasses.asdict(cfg.lora)}}


def finish(run: Run) -> dict:
    """Loss plot, summary, and (``merge``) the merged model."""
    records = run.metrics.records()
    png = plot_loss(records, os.path.join(run.out, "loss.png"))
    summary = {"output_dir": run.out, "steps": run.cfg.steps, "resumed_from": run.start, "metrics": run.metrics.path,
               "loss_png": png, "checkpoints": os.path.join(run.out, "checkpoints"),
               "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}
    if run.cfg.merge:
        summary["merged"] = merge_checkpoint(summary["checkpoints"], os.path.join(run.out, "merged"))
        log.info("merged model written to %s", summary["merged"])
    log.info("done: %s", summary)
    return summary


class _progress:
    """tqdm on a terminal, nothing otherwise (the log lines carry progress)."""

    def __init__(self, total: int, initial: int):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, r: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_s']:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
