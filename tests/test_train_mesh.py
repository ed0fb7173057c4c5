"""One training step on 8 fake CPU devices (several meshes) equals the single-device step.

Runs in a subprocess: the fake devices need XLA_FLAGS before JAX starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # whole training runs (tens of seconds each)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from train import data, lora, trainer
from train.config import DataConfig, LoraConfig, TrainConfig
from train.mesh import batch_sharding
from gptoss_jax.sharding import mesh_from_spec
import optax

ckpt, mode, specs = sys.argv[1], sys.argv[2], sys.argv[3].split(";")
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
samples = [data.Sample(rng.integers(0, 1024, n).astype(np.int32), rng.random(n) < 0.7, f"s{i}")
           for i, n in enumerate([20, 33, 17, 9, 30, 25, 12, 28, 31, 14, 22, 19, 8, 27, 16, 21])]
rows = data.pack(samples, 40, packing=False)
rows = {k: v[:16].reshape(2, 8, 40) for k, v in rows.items()}  # 2 micro-batches of 8 rows
cfg = TrainConfig(checkpoint=ckpt, mode=mode, dtype="float32", data=DataConfig(train=["-"]),
                  lora=LoraConfig(rank=4, alpha=8.0))
out = {}
for spec in specs:
    mesh = mesh_from_spec(spec) if spec else None
    model = trainer.build_model(cfg, mesh)
    if mode == "lora":  # non-zero B so that every adapter gets a gradient
        for adapter in lora.adapters(model):
            b = adapter.b
            b.set_value(jnp.asarray(0.02 * np.random.default_rng(1).standard_normal(b.shape), jnp.float32))
    state = trainer.split(model, mode, mesh)
    tx = optax.sgd(1.0)  # new params = old - gradient: compares the gradients themselves
    step, _, opt = trainer.compile_steps(state, tx, mesh)
    start = {k: np.asarray(v) for k, v in state.params.items()}
    params, opt, m = step(state.params, opt, state.frozen, jax.device_put(rows, batch_sharding(mesh, 3, 1)),
                          jax.random.PRNGKey(0))
    losses = [float(m["loss"]), float(m["grad_norm"])]
    shards = {k: str(v.sharding.spec) for k, v in params.items()} if mesh else {}
    # with SGD(1.0), start - new = the gradient
    out[spec] = {"losses": losses, "grads": {k: (start[k] - np.asarray(v)).tolist() for k, v in params.items()},
                 "sharded": sorted({s for s in shards.values() if s != "PartitionSpec()"})}
json.dump(out, sys.stdout)
'''


def _run(ckpt: str, mode: str, specs: list[str]) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": ROOT,
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ckpt, mode, ";".join(specs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _compare(out: dict, specs: list[str]):
    import numpy as np

    ref = out[""]
    for spec in specs[1:]:
        got = out[spec]
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, err_msg=spec)  # loss, gradient norm
        for k, v in ref["grads"].items():
            a, b = np.asarray(got["grads"][k]), np.asarray(v)
            assert np.abs(b).max() > 0 and np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (spec, k)
        if "expert" in spec:
            assert any("expert" in s for s in got["sharded"]), got["sharded"]  # really sharded


def test_lora_step_on_meshes_equals_single_device(tiny_hf):
    specs = ["", "data=8", "data=2,expert=4"]
    _compare(_run(tiny_hf, "lora", specs), specs)


def test_full_step_on_a_mesh_equals_single_device(tiny_hf):
    specs = ["", "data=2,expert=2,model=2"]
    _compare(_run(tiny_hf, "full", specs), specs)
