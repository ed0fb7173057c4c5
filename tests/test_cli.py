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
    p = subprocess.run([sys.executable, "-m", "gptoss_cli.main", "--log-level", "WARNING", *args], cwd=ROOT, env=env,
                       input=stdin, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"gptoss-jax {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory, o200k_path):
    folder = tmp_path_factory.mktemp("demo")
    return folder, gptoss("demo", "--dir", str(folder), "--max-tokens", "6", "--context", "128", *FAST, vocab=o200k_path)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    bad = subprocess.run([sys.executable, "-m", "gptoss_cli.main", "generate", "--prompt", "x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--ckpt" in bad.stderr


# ------------------------------------------------------------------ argument errors: before any model load
def _main(argv, capsys, monkeypatch):
    """Run ``gptoss-jax ARGV`` in this process with the model load replaced by a tripwire; returns
    (exit status, stderr lines)."""
    from gptoss_cli import main as cli
    from gptoss_jax.serving import options

    def tripwire(*a, **k):
        raise AssertionError("the model load started: the argument was not validated first")

    monkeypatch.setattr(options, "build_engine", tripwire)
    capsys.readouterr()
    try:
        code = cli.main(["--log-level", "WARNING", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err.splitlines()


def _command(name):
    """The command with its other required arguments (serve: any free port, not 8000)."""
    return {"generate": ["generate", "--prompt", "hi"], "serve": ["serve", "--port", "0"]}.get(name, [name])


@pytest.fixture
def busy_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a checkpoint")
    (tmp_path / "half_converted" / "params").mkdir(parents=True)  # a conversion that never finished
    return tmp_path


BAD = [  # (arguments after the command and --ckpt, fragment of the one error line)
    (["--temperature", "-1"], "--temperature: must be in [0, inf)"),
    (["--temperature", "nan"], "--temperature: must be in [0, inf)"),
    (["--top-p", "2"], "--top-p: must be in (0, 1]"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k: must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens: must be >= 1"),
    (["--context", "0"], "--context: must be >= 1"),
    (["--max-batch", "0"], "--max-batch: must be >= 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk: must be >= 1"),
    (["--kv-bucket-min", "0"], "--kv-bucket-min: must be >= 1"),
    (["--seed", "1e23"], "--seed: '1e23' is not an integer"),
    (["--seed", "-1"], "--seed: must be in [0, 9223372036854775807]"),
    (["--mesh", "expert=16"], "needs 16 devices, only 8 available"),  # conftest: 8 CPU devices
    (["--mesh", "experts=2"], "is not AXIS=SIZE"),
    (["--coordinator", "127.0.0.1:1234"], "needs --num-processes and --process-id"),
    (["--vocab", "/nonexistent/o200k_base.tiktoken"], "not found"),
]


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_one_error_line_before_the_model_loads(command, extra, message, tiny_hf, capsys,
                                                               monkeypatch):
    code, err = _main([*_command(command), "--ckpt", str(tiny_hf), *extra], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


SERVE_BAD = [  # serve's own flags
    (["--max-request-bytes", "0"], "--max-request-bytes: must be >= 1024"),
    (["--render-workers", "0"], "--render-workers: must be in [1, 64]"),
    (["--render-timeout", "0"], "--render-timeout: must be in (0, inf)"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout: must be in [0, inf)"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout: must be in [0, inf)"),
    (["--port", "70000"], "--port: must be in [0, 65535]"),
    (["--responses-store", "-1"], "--responses-store: must be >= 0"),
]


@pytest.mark.parametrize("extra, message", SERVE_BAD, ids=[" ".join(a) for a, _ in SERVE_BAD])
def test_bad_serve_argument_is_one_error_line_before_the_model_loads(extra, message, tiny_hf, capsys, monkeypatch):
    code, err = _main([*_command("serve"), "--ckpt", str(tiny_hf), *extra], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("folder, message", [
    ("missing", "no such folder"), ("a_file", "not a folder"), ("empty", "unknown layout"),
    ("half_converted", "incomplete gptoss-jax checkpoint"),
])
@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_bad_checkpoint_folder_is_one_error_line(command, folder, message, bad_folders, capsys, monkeypatch):
    code, err = _main([*_command(command), "--ckpt", str(bad_folders / folder)], capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --ckpt {bad_folders / folder}: "), err
    assert message in err[0], err


def test_busy_port_is_refused_before_the_model_loads(tiny_hf, busy_port, capsys, monkeypatch):
    code, err = _main(["serve", "--ckpt", str(tiny_hf), "--port", str(busy_port)], capsys, monkeypatch)
    assert code == 2 and err == [f"error: --port {busy_port}: cannot listen on 127.0.0.1:{busy_port} "
                                 f"(Address already in use)"], err
    code, err = _main(["demo", "--serve", "--port", str(busy_port), "--dir", "/nonexistent/never-written"],
                      capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and "Address already in use" in err[0], err


def test_valid_arguments_reach_the_model_load(tiny_hf, capsys, monkeypatch):
    """The tripwire above really is where the load starts: arguments that pass validation reach it."""
    with pytest.raises(AssertionError, match="the model load started"):
        _main(["serve", "--ckpt", str(tiny_hf), "--port", "0", "--mesh", "expert=4,model=2", "--top-p", "0.5",
               "--temperature", "0"], capsys, monkeypatch)


def test_user_errors_in_a_real_process_print_no_traceback(tmp_path):
    """One line and status 2 as a user sees it; ``--log-level DEBUG`` shows the traceback."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "gptoss_cli.main", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    missing = str(tmp_path / "nope")
    p = run("generate", "--prompt", "x", "--ckpt", missing)
    assert p.returncode == 2 and p.stderr == f"error: --ckpt {missing}: no such folder\n", p.stderr
    p = run("--log-level", "DEBUG", "generate", "--prompt", "x", "--ckpt", missing)
    assert p.returncode == 1 and "Traceback" in p.stderr and "UsageError: --ckpt" in p.stderr, p.stderr[-2000:]
    p = run("convert", str(tmp_path), str(tmp_path / "out"))
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr


def test_ctrl_c_at_the_chat_prompt_asks_again_and_ctrl_d_exits():
    """Ctrl-C at the prompt keeps the session (a hint, then the prompt again); Ctrl-D ends it."""
    import argparse
    import io

    from gptoss_jax.serving.cli_chat import INTERRUPT_HINT, chat

    keys = iter([KeyboardInterrupt, "/effort low", KeyboardInterrupt, EOFError, "never read"])
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        key = next(keys)
        if isinstance(key, type):
            raise key
        return key

    err = io.StringIO()
    args = argparse.Namespace(reasoning_effort="high", system=None, ckpt="ck", hide_reasoning=False)
    chat(None, None, args, read=read, err=err)  # no generation happens: only commands and keys
    assert prompts == [">>> "] * 4
    assert err.getvalue().count(INTERRUPT_HINT) == 2 and "(reasoning effort low)" in err.getvalue()
