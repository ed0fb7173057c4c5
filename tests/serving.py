"""Helpers for the tests that run `gptoss-jax serve` as a real process on a random tiny-harmony checkpoint."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from convert.synthetic import write_random_checkpoint
from gptoss_jax import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-key"
MODEL = "tiny-random"
CONTEXT = 384
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
STARTUP_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log_path: str, timeout: float = STARTUP_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not up after {timeout}s:\n{open(log_path).read()[-4000:]}")


@contextlib.contextmanager
def running_server(tmp, vocab: str, *extra: str):
    """`gptoss-jax serve` in a subprocess on 127.0.0.1:<free port> with ``extra`` arguments; yields
    (base URL, process, log path) and terminates the process after (if still running)."""
    ckpt = write_random_checkpoint(tmp / MODEL, PRESETS["tiny-harmony"], seed=0)
    port = free_port()
    log_path = str(tmp / "server.log")
    env = {**os.environ, "GPTOSS_VOCAB": vocab, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "gptoss_cli.main", "serve", "--ckpt", ckpt, "--port", str(port), "--api-key", KEY,
           "--max-batch", "4", "--context", str(CONTEXT), "--prefill-chunk", "16", "--max-tokens", "8", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def openai_client(server: str, timeout: float = 120) -> openai.OpenAI:
    """The official client for the server at ``server`` (our key, no retries)."""
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=timeout)


def leave_mid_stream(server: str, path: str, body: dict, first: str = "data: {") -> None:
    """POST ``body`` streamed to ``path`` and leave once a line starting with ``first`` arrived (the
    first chunk: generation is under way)."""
    with httpx.stream("POST", f"{server}{path}", json={**body, "stream": True}, timeout=60,
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith(first):
            pass


def give_up_waiting(server: str, path: str, body: dict) -> None:
    """POST ``body`` unstreamed to ``path`` and give up after 0.5 s, as an impatient client does."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}{path}", timeout=0.5, headers={"authorization": f"Bearer {KEY}"},
                   json={**body, "stream": False})


def health(server) -> dict:
    return httpx.get(f"{server}/health", timeout=10).json()


def wait_idle(server, timeout: float = 30) -> dict:
    """Until no request is in flight in the server nor running in the engine."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if h["requests_in_flight"] == 0 and not h["engine"].get("active"):
            return h
        if time.monotonic() > deadline:
            pytest.fail(f"slots still busy after {timeout}s: {h}")
        time.sleep(0.2)


def raw_post(server, body: bytes, key: str | None = KEY, timeout: float = 60, **headers):
    headers = {"content-type": "application/json", **headers}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(f"{server}/v1/chat/completions", content=body, headers=headers, timeout=timeout)


def assert_openai_error(response, status: int, code=None, param=None):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and (param is None or err["param"] == param)
    return err


class ReplayRequest:
    """Stands in for an engine Request, yielding fixed ids (the engine needs trained weights to make them)."""

    def __init__(self, tokens):
        self.tokens, self.finish_reason, self.cancelled = tokens, None, False

    async def aiter(self):
        for t in self.tokens:
            if self.cancelled:
                break
            yield t
        self.finish_reason = "cancelled" if self.cancelled else "stop"

    def cancel(self):
        self.cancelled = True


class ReplayEngine:
    context = 4096

    def __init__(self):
        self.outputs, self.prompts = [], []

    def submit(self, prompt, params):
        self.prompts.append(prompt)
        return ReplayRequest(self.outputs.pop(0)[:params.max_tokens])


def sleeper():
    """A WorkerPool handler factory for tests: the handler sleeps the payload's seconds."""
    return time.sleep
