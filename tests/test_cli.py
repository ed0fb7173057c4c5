"""The generate, chat and demo commands, run as subprocesses the way a user runs them."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ("--prefill-chunk", "16", "--max-batch", "1")  # one chunk shape and a batch of one to compile
SUMMARY = re.compile(r"\[(\d+) prompt \+ (\d+) generated tokens, [\d.]+ tokens/s, finish: (stop|length|tool_calls)\]")


def gptoss(*args, stdin: str | None = None, vocab: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPTOSS_VOCAB": vocab, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "--log-level", "WARNING", *args], cwd=ROOT, env=env,
                       input=stdin, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"gptoss-jax {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory, o200k_path):
    folder = tmp_path_factory.mktemp("demo")
    return folder, gptoss("demo", "--dir", str(folder), "--max-tokens", "6", "--context", "128", *FAST, vocab=o200k_path)


def test_demo(demo):
    folder, p = demo
    official, converted = folder / "tiny-harmony-random", folder / "tiny-harmony-random-jax"
    assert (official / "config.json").is_file() and (official / "model.safetensors").is_file()
    assert (converted / "gptoss_jax.json").is_file() and (converted / "params").is_dir()  # what the engine loaded
    assert not [f for f in os.listdir(folder) if f.startswith(".")]  # no half-written temporary left
    assert "RANDOM weights" in p.stderr and "gibberish" in p.stderr
    prompt_tokens, generated, _ = SUMMARY.search(p.stderr).groups()
    assert int(prompt_tokens) > 60 and 1 <= int(generated) <= 6
    assert f"gptoss-jax serve --ckpt {converted}" in p.stderr


def test_generate_raw_greedy_equals_full_forward(demo, o200k_path):
    """`generate --raw --temperature 0` prints the argmax rollout of the full (uncached) forward pass, also
    when it runs on a mesh (conftest's XLA_FLAGS give the subprocess 8 CPU devices)."""
    import gptoss_jax
    from gptoss_jax.tokenizer import STOP_TOKEN_IDS, load_tokenizer

    ckpt = str(demo[0] / "tiny-harmony-random")
    text, steps = "The capital of France is", 6
    p = gptoss("generate", "--ckpt", ckpt, "--raw", "--prompt", text, "--temperature", "0", "--max-tokens", str(steps),
               "--dtype", "float32", "--context", "64", "--mesh", "expert=4,model=2", *FAST, vocab=o200k_path)
    tok = load_tokenizer(o200k_path)
    model = gptoss_jax.load(ckpt, dtype=jnp.float32)
    ids = tok.encode(text)
    n = len(ids)
    width = n + steps
    for _ in range(steps):  # right-padded to one width: one compilation
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        mask = np.arange(width)[None] < len(ids)
        ids.append(int(np.argmax(np.asarray(model.logits(tokens, mask))[0, len(ids) - 1])))
        if ids[-1] in STOP_TOKEN_IDS + (tok.eot_token,):
            ids.pop()
            break
    assert p.stdout == tok.decode(ids[n:]) + "\n"
    assert SUMMARY.search(p.stderr).group(1) == str(n)


def test_chat_session(demo, o200k_path):
    ckpt = str(demo[0] / "tiny-harmony-random-jax")  # the converted folder the demo served
    p = gptoss("chat", "--ckpt", ckpt, "--max-tokens", "3", "--context", "256", "--reasoning-effort", "high", *FAST,
               stdin="Hello!\n/effort low\n/bogus\n\nAnd again?\n/reset\n/exit\nnever read\n", vocab=o200k_path)
    summaries = SUMMARY.findall(p.stderr)
    assert len(summaries) == 2
    # the second turn's prompt holds the first exchange, so it is longer (despite the lower effort)
    assert int(summaries[1][0]) > int(summaries[0][0])
    for expected in ("reasoning effort high", "(reasoning effort low)", "unknown command", "(conversation cleared)"):
        assert expected in p.stderr


def test_help_and_usage_errors(o200k_path):
    p = gptoss("--help", vocab=o200k_path)
    for command in ("generate", "chat", "serve", "demo"):
        assert command in p.stdout
    bad = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "generate", "--prompt", "x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ckpt" in bad.stderr
