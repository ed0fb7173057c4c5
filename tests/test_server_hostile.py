"""The server under hostile input, as a real process (tests/serving.py): pathological runs of characters,
invalid Unicode, oversized and huge-but-allowed bodies, out-of-range fields, 64 concurrent streams, and
SIGTERM with requests in flight (last: it stops the server). /health must stay fast throughout.
Errors the real process cannot be made to raise (a crash, a failure mid-stream) are driven in-process."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import statistics
import threading
import time

import httpx
import pytest

from tests.serving import (CONTEXT, KEY, MESSAGES, MODEL, ReplayEngine, ReplayRequest, assert_openai_error, health,
                           raw_post, running_server, sleeper, wait_idle)

SHUTDOWN_S = 2
#: /health latency bound while a request renders or generates; the median of the probes is compared,
#: so one probe that the OS scheduled late on a busy machine does not decide
HEALTH_MS = 50
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, o200k_path):
    """(URL, process, log path) of a server with the default 8 MiB body cap and a short shutdown timeout."""
    with running_server(tmp_path_factory.mktemp("hostile"), o200k_path, "--shutdown-timeout", str(SHUTDOWN_S)) as s:
        yield s


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def fmt(o200k_path):
    from gptoss_jax.harmony import ChatFormat

    return ChatFormat(o200k_path)


def chat(content=None, **fields) -> bytes:
    messages = MESSAGES if content is None else [{"role": "user", "content": content}]
    return json.dumps({"model": MODEL, "messages": messages, **fields}).encode()


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def log_text(served) -> str:
    return open(served[2]).read()


@pytest.mark.parametrize("text", ["a" * 1_000_000, " " * 1_000_000, "a" * 100_000, "!" * 100_000],
                         ids=["1M-a", "1M-spaces", "100K-a", "100K-punct"])
def test_pathological_runs_refused_fast(served, text):
    """Longer than the context can hold: refused by the byte bound before any tokenizer runs."""
    r, seconds = timed(raw_post, served[0], chat(text))
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
    assert "at least" in err["message"]
    assert seconds < 5, seconds
    assert "panicked" not in log_text(served) and "stack backtrace" not in log_text(served)


def test_long_run_within_the_bound_is_tokenized(served, fmt):
    """40,000 'a' pass the byte bound (312 tokens at least): rendered in linear time, then the exact count
    (openai-harmony alone takes ~1 s, quadratic in the run)."""
    text = "a" * 40_000
    r, seconds = timed(raw_post, served[0], chat(text))
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
    n = len(fmt.render([{"role": "user", "content": text}]))
    assert f"take {n} tokens" in err["message"]
    assert seconds < 5, seconds


def test_lone_surrogate(server):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\\ud83db"}]}' % MODEL.encode()
    err = assert_openai_error(raw_post(server, body), 400, param="messages[1].content")
    assert err["type"] == "invalid_request_error" and "surrogate" in err["message"]
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "stop": ["\udc00"]}).encode()
    assert_openai_error(raw_post(server, body), 400, param="stop[0]")


@pytest.mark.parametrize("field, value", [("seed", 1e23), ("seed", -1), ("seed", 2**63), ("seed", 1.5),
                                          ("temperature", 3), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5),
                                          ("top_k", -1), ("top_k", 2**40), ("n", 0), ("n", 1000),
                                          ("max_tokens", 0), ("max_tokens", 1e23), ("max_completion_tokens", -5)])
def test_out_of_range_fields(server, field, value):
    err = assert_openai_error(raw_post(server, chat(**{field: value})), 400, param=field)
    assert "SamplingParams" not in err["message"] and err["message"].startswith(f"{field}:")


def test_non_finite_numbers_are_not_json(server):
    assert_openai_error(raw_post(server, chat().replace(b'"messages"', b'"temperature": NaN, "messages"')), 400)


def test_body_over_the_cap(server):
    big = chat("x" * (9 << 20))
    r, seconds = timed(raw_post, server, big)
    assert_openai_error(r, 413, code="request_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(9 * 16):
            yield b" " * (64 << 10)
    r = httpx.post(f"{server}/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_openai_error(r, 413, code="request_too_large")
    assert seconds < 10, seconds


def probe_health(server, busy, stop: threading.Event) -> list[float]:
    """/health latencies (ms) of the probes answered while ``busy(health)`` held, until ``stop``."""
    out = []
    with httpx.Client(timeout=30) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            h = c.get(f"{server}/health").json()
            ms = 1000 * (time.perf_counter() - t0)
            if busy(h):
                out.append(ms)
            time.sleep(0.005)
    return out


def test_huge_body_rendered_off_the_event_loop(server):
    """7 MB, 200,000 short messages (under the 8 MiB cap): parsed and checked in a render worker, refused
    by the message bound; /health answers fast all the while (it stalled 12.6 s when this ran on the loop)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 200_000}).encode()
    assert 6.9e6 < len(body) < 8 << 20
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        probes = pool.submit(probe_health, server, lambda h: h["rendering"] > 0, stop)
        r, seconds = timed(raw_post, server, body)
        stop.set()
        latencies = probes.result()
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
    assert "at least 800002 tokens" in err["message"]
    assert len(latencies) >= 3, (latencies, seconds)  # the render lasted long enough to be probed
    assert statistics.median(latencies) < HEALTH_MS, latencies
    print(f"7 MB body: {r.status_code} in {seconds:.2f} s; /health during the render: {len(latencies)} probes, "
          f"median {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms")


def test_every_error_is_json(server):
    assert_openai_error(httpx.get(f"{server}/nothing", timeout=10), 404)
    assert_openai_error(httpx.get(f"{server}/v1/chat/completions", headers=AUTH, timeout=10), 405)
    assert_openai_error(httpx.delete(f"{server}/health", timeout=10), 405)
    assert_openai_error(raw_post(server, b"\xff\xfe not utf-8"), 400)
    assert_openai_error(raw_post(server, b"[" * 100_000), 400)  # nesting deeper than the parser's recursion
    non_ascii_key = {b"authorization": "Bearer sk-\u00e9t\u00e9".encode(), b"content-type": b"application/json"}
    assert_openai_error(httpx.post(f"{server}/v1/chat/completions", content=chat(), headers=non_ascii_key, timeout=10),
                        401, code="invalid_api_key")


def stream_chat(server, i: int, max_tokens: int) -> dict:
    """One streaming client (bounded: at most max_tokens + 8 events); its finish reason, usage and [DONE]."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}], "stream": True,
            "max_tokens": max_tokens, "seed": i, "stream_options": {"include_usage": True}}
    out = {"finish": [], "usage": None, "done": False, "events": 0}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            out["events"] += 1
            assert out["events"] <= 4 * max_tokens + 8, out  # bounded: a runaway stream fails, never hangs
            assert not out["done"], line
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                out["done"] = True
                continue
            event = json.loads(payload)
            assert "error" not in event, event
            if event.get("usage"):
                out["usage"] = event["usage"]
            out["finish"] += [c["finish_reason"] for c in event["choices"] if c["finish_reason"]]
    return out


@pytest.mark.slow
def test_64_concurrent_streams(server):
    before = wait_idle(server)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(65) as pool:
        probes = pool.submit(probe_health, server, lambda h: h["engine"]["active"] > 0, stop)
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: stream_chat(server, i, 3 + i % 3), range(64)))
        seconds = time.perf_counter() - t0
        stop.set()
        latencies = probes.result()
    for i, r in enumerate(results):
        assert r["done"] and len(r["finish"]) == 1 and r["finish"][0] in ("stop", "length"), (i, r)
        assert 1 <= r["usage"]["completion_tokens"] <= 3 + i % 3, (i, r)
    after = wait_idle(server)
    assert after["completed"] - before["completed"] == 64 and after["cancelled"] == before["cancelled"]
    assert after["engine"]["active"] == 0 and after["engine"]["waiting"] == 0 and after["rendering"] == 0
    assert len(latencies) >= 3 and statistics.median(latencies) < HEALTH_MS, latencies
    print(f"64 streams in {seconds:.2f} s; /health while generating: {len(latencies)} probes, "
          f"median {statistics.median(latencies):.1f} ms")


# --- in-process: a crash and a failure mid-stream ------------------------------------------------------

class FailingRequest(ReplayRequest):
    async def aiter(self):
        async for t in super().aiter():
            yield t
        raise RuntimeError("the device fell over")


class FailingEngine(ReplayEngine):
    def submit(self, prompt, params):
        if params.max_tokens == 1:
            raise RuntimeError("boom")
        return FailingRequest(self.outputs.pop(0))


@pytest.fixture(scope="module")
def inproc(fmt):
    from fastapi.testclient import TestClient

    from gptoss_jax.decode import SamplingParams
    from gptoss_jax.serving.server import create_app, render_pool

    engine = FailingEngine()
    renderer = render_pool(fmt, engine.context, workers=1)
    app = create_app(engine, fmt, MODEL, context=engine.context, default_params=SamplingParams(max_tokens=64),
                     renderer=renderer, max_request_bytes=1000)
    yield fmt, engine, TestClient(app, raise_server_exceptions=False)
    renderer.close()


def test_crash_and_stream_failure_are_json(inproc):
    fmt, engine, http = inproc
    r = http.post("/v1/chat/completions", content=chat(max_tokens=1))
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and "RuntimeError" in err["message"]
    assert_openai_error(http.post("/v1/chat/completions", content=chat("x" * 1000)), 413, code="request_too_large")
    engine.outputs.append(fmt.tokenizer.encode("<|channel|>final<|message|>Hi", allowed_special="all"))
    lines = [x for x in http.post("/v1/chat/completions", content=chat(stream=True)).text.splitlines() if x]
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "server_error"
    assert lines[-1] == "data: [DONE]"


@pytest.mark.slow
def test_render_time_budget(o200k_path):
    """A call over the budget kills its worker and raises; a fresh worker takes the next call."""
    import asyncio

    from gptoss_jax.serving.workers import WorkerPool

    pool = WorkerPool(sleeper, workers=1, timeout=0.5)
    try:
        pool.wait_ready()
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            asyncio.run(pool.acall(30.0))
        assert time.perf_counter() - t0 < 10
        assert asyncio.run(pool.acall(0.0)) is None
    finally:
        pool.close()


# --- last: it stops the module's server ---------------------------------------------------------------

def test_sigterm_finishes_requests_in_flight(served):
    """SIGTERM with a stream and a plain request generating: the listener closes, both run on for
    SHUTDOWN_S seconds, then end with finish_reason "length" (the stream with its last chunk and [DONE],
    the plain request with a whole JSON answer), and the server exits 0."""
    server, proc, _ = served
    long = {"model": MODEL, "messages": MESSAGES, "max_tokens": CONTEXT, "temperature": 1.0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(stream_chat, server, 1, CONTEXT)
        plain = pool.submit(httpx.post, f"{server}/v1/chat/completions", json=long, headers=AUTH, timeout=120)
        deadline = time.monotonic() + 60
        while health(server)["requests_in_flight"] < 2:
            assert time.monotonic() < deadline, health(server)
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections
            httpx.get(f"{server}/health", timeout=5)
        s, p = stream.result(timeout=60), plain.result(timeout=60)
        seconds = time.monotonic() - t0
    assert s["done"] and s["finish"] == ["length"], s
    assert p.status_code == 200, p.text
    assert p.json()["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0
    assert seconds < SHUTDOWN_S + 5, seconds  # not left to uvicorn's own cut (SHUTDOWN_S + 5 s)
    usage = p.json()["usage"]
    if "shutdown timeout: ending" in log_text(served):  # cut at the timeout (as on a 2-core machine)
        assert seconds > SHUTDOWN_S - 0.5, seconds
        assert usage["completion_tokens"] < CONTEXT - usage["prompt_tokens"]
    else:  # a fast machine generated the ~300 tokens within the timeout
        assert usage["completion_tokens"] == CONTEXT - usage["prompt_tokens"]
    print(f"SIGTERM: stream and plain request ended after {seconds:.2f} s with finish_reason 'length'")
