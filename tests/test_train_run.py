"""The whole run through ``python -m train``: harmony chat data on tiny-harmony (the real vocabulary),
SIGKILL mid-run then resume (same loss sequence as an uninterrupted run), NaN stop, merge + export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # whole training runs (tens of seconds each)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "train", "data")


@pytest.fixture(scope="module")
def tiny_harmony(tmp_path_factory):
    from convert.synthetic import write_random_checkpoint
    from gptoss_jax.config import PRESETS

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_harmony"), PRESETS["tiny-harmony"], seed=2)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_harmony, o200k_path):
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(f"""
checkpoint = "{tiny_harmony}"
mode = "lora"
steps = 8
batch_size = 1
grad_accum = 2
dtype = "float32"
checkpoint_interval = 2
keep_checkpoints = 2
eval_interval = 4
log_interval = 1
[data]
train = ["{DATA}/tiny_chat.jsonl"]
eval = ["{DATA}/tiny_chat_eval.jsonl"]
sequence_length = 128
encodings_dir = "{os.path.dirname(o200k_path)}"
[lora]
rank = 4
alpha = 8.0
dropout = 0.1
[optimizer]
learning_rate = 3e-3
warmup_steps = 2
""")
    return str(path)


def _cmd(config, out, *extra):
    return [sys.executable, "-m", "train", config, "--output_dir", str(out), *extra]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss")) for r in records]


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    proc = subprocess.run(_cmd(config, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def test_sigkill_then_resume_gives_the_uninterrupted_loss_sequence(config, uninterrupted, tmp_path):
    out = tmp_path / "run_b"
    metrics = out / "metrics.jsonl"
    proc = subprocess.Popen(_cmd(config, out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and sum(1 for line in metrics.read_text().splitlines() if '"loss"' in line) >= 3:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_losses(out)) < len(_losses(uninterrupted))
    resumed = subprocess.run(_cmd(config, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr
    a, b = _losses(uninterrupted), _losses(out)
    assert [r[0] for r in a] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]  # train steps and the evaluations at 4 and 8
    assert b == a  # bit-identical losses, gradient norms and eval losses
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    assert sorted(os.listdir(os.path.join(out, "checkpoints")))[-2:] == ["6", "8"]  # keep_checkpoints = 2


def test_loss_falls_on_the_chat_data(uninterrupted):
    losses = [r[1] for r in _losses(uninterrupted) if r[1] is not None]
    assert losses[-1] < 0.8 * losses[0]


def test_merged_export_loads_in_gptoss_jax_and_transformers(uninterrupted, tmp_path):
    """Merging writes our checkpoint format (gptoss_jax.load reads back exactly the merged weights) or,
    through the converter's export, an official folder from which transformers computes the same logits."""
    import gptoss_jax
    from tests.reference import load_reference, reference_logits
    from train import lora
    from train.merge import load_lora_model, merge_checkpoint

    ckpts = os.path.join(uninterrupted, "checkpoints")
    path = merge_checkpoint(ckpts, str(tmp_path / "merged"))
    in_memory = lora.merge_lora(load_lora_model(ckpts, dtype="float32"))
    tokens = np.random.default_rng(0).integers(0, 201088, (2, 20))
    want = np.asarray(in_memory.logits(tokens))
    ours = np.asarray(gptoss_jax.load(path, dtype=jnp.float32).logits(tokens))
    np.testing.assert_array_equal(ours, want)
    official = merge_checkpoint(ckpts, str(tmp_path / "official"), official=True)
    np.testing.assert_array_equal(np.asarray(gptoss_jax.load(official, dtype=jnp.float32).logits(tokens)), want)
    ref = reference_logits(load_reference(official), tokens)
    assert np.abs(ref - want).max() <= 1e-4


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(config, tmp_path):
    from train.checkpointing import Checkpoints
    from train.config import load
    from train.trainer import TrainingError, train

    cfg = load(config, [("output_dir", str(tmp_path / "nan")), ("optimizer.learning_rate", 1e30),
                        ("optimizer.warmup_steps", 0), ("checkpoint_interval", 1), ("data.eval", [])])
    with pytest.raises(TrainingError, match=r"step 2: loss is (nan|inf).*last good checkpoint is step 1 in "):
        train(cfg)
    ckpts = Checkpoints(os.path.join(cfg.output_dir, "checkpoints"))
    assert ckpts.all_steps() == [1] and ckpts.read_meta()["step"] == 1


def test_config_errors_reach_the_command_line(config, tmp_path):
    proc = subprocess.run(_cmd(config, tmp_path / "x", "--set", "lora.rank=-1"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "field 'lora.rank' must be a positive integer" in proc.stderr
