"""Training checkpoints with Orbax's CheckpointManager.

One step's checkpoint holds ``params`` (the trainable parameters only: adapters in lora mode),
``opt_state`` (optax), and ``meta`` (JSON: step, data position, RNG key, and what is needed to
rebuild the model for merging: base checkpoint, mode, dtype, LoRA settings). Orbax writes each step
into a temporary folder and renames it when complete, so a killed run leaves only whole checkpoints;
``max_to_keep`` prunes old ones.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from gptoss_jax.checkpoint.orbax import LEGACY_QKV

#: the separate q/k/v parameter names of checkpoints written before the fused projection
LEGACY_LEAVES = frozenset(name for names in LEGACY_QKV.values() for name in names)

log = logging.getLogger(__name__)


class Checkpoints:
    """``directory``/<step>/{params, opt_state, meta}."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int | None, params_like, opt_state_like=None):
        """-> (params, opt_state or None, meta). ``*_like``: arrays or ShapeDtypeStructs (with shardings)
        giving the structure and placement to restore into."""
        step = self._step(step)
        items = {"params": ocp.args.StandardRestore(_abstract(params_like)), "meta": ocp.args.JsonRestore()}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError:
            problem = self._params_mismatch(step, params_like)  # a clear error when the parameter names differ
            if problem is None:
                raise
            raise ValueError(problem) from None
        return got["params"], got.get("opt_state") if opt_state_like is not None else None, got["meta"]

    def _params_mismatch(self, step: int, params_like) -> str | None:
        """What is wrong when the stored parameter names are not the run's (Orbax lists tree differences
        without a cause), or None when they are."""
        where = os.path.join(self.directory, str(step))
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            stored = set(checkpointer.metadata(os.path.join(where, "params")).item_metadata.tree)
        want = set(params_like)
        if stored == want:
            return None
        legacy = sorted(k for k in stored - want if k.rpartition(".")[2] in LEGACY_LEAVES)
        if legacy:
            return (
                f"{where}: holds '{legacy[0]}' ({len(legacy)} separate q/k/v parameters), written before each "
                f"layer's q/k/v projections were fused into attn.qkv_kernel / attn.qkv_bias; this version cannot "
                f"resume that full fine-tuning state. Finish or save the run with the gptoss-jax that wrote it "
                f"(its saved model folders load here: fused at load), or start the run again in a new output "
                f"directory. LoRA runs are not affected (their adapters are unchanged).")
        missing, extra = sorted(want - stored), sorted(stored - want)
        return (f"{where}: the checkpoint's parameters are not this run's (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); was it written with another mode or model?")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} (have {self.all_steps()})")
        return step


def _abstract(tree):
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)
