"""The OpenAI-compatible server, started as a real process on a random tiny-harmony checkpoint and driven
with the official ``openai`` client: streaming and not, 16 concurrent clients, every error case,
clients that disconnect mid-request. Tool calls need a trained model, so those tests replay
openai-harmony-rendered model output through the same app in-process."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from tests.serving import (CONTEXT, KEY, MESSAGES, MODEL, ReplayEngine, assert_openai_error, give_up_waiting, health,
                           leave_mid_stream, openai_client, raw_post, running_server, wait_idle)


@pytest.fixture(scope="module")
def server(tmp_path_factory, o200k_path):
    """`gptoss-jax serve` in a subprocess on 127.0.0.1:<free port>; yields its base URL."""
    with running_server(tmp_path_factory.mktemp("serve"), o200k_path) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion(client, o200k_path):
    from gptoss_jax.harmony import ChatFormat

    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                       reasoning_effort="low")
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ChatFormat(o200k_path).render(MESSAGES, reasoning_effort="low"))
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    text = (choice.message.content or "") + (getattr(choice.message, "reasoning_content", None) or "")
    assert text  # random weights: gibberish, but something
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                           reasoning_effort="low")
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.8, seed=1234)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == (whole.choices[0].message.content or "")
    assert reasoning == (getattr(whole.choices[0].message, "reasoning_content", None) or "")
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_logprobs(client, stream):
    """logprobs / top_logprobs on chat: every content token has its log-probability (<= 0), top_logprobs
    sorted with probabilities summing to <= 1; penalties and logit_bias are accepted (the sampler's step
    inputs; that logprobs equal the model's log-softmax is tested on the engine, tests/test_decode.py)."""
    import math

    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5,
                  presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"200005": -100})
    r = client.chat.completions.create(**kwargs, stream=stream)
    if stream:
        chunks = list(r)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        entries, content = r.choices[0].logprobs.content, r.choices[0].message.content or ""
    if not any("\ufffd" in e.token for e in entries):  # (a token may end inside a UTF-8 character)
        assert "".join(e.token for e in entries) == content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and sum(map(math.exp, tops)) <= 1 + 1e-5
        assert e.logprob <= 0 and e.bytes


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert 3 <= r.usage.completion_tokens <= 12


@pytest.mark.slow
def test_sixteen_concurrent_clients(client, server):
    def one(i):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=3 + i % 4, seed=i)
        if i % 2:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        return client.chat.completions.create(**kwargs).choices[0].finish_reason

    before = health(server)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        reasons = list(pool.map(one, range(16)))
    assert all(r in ("stop", "length") for r in reasons), reasons
    after = wait_idle(server)
    assert after["completed"] - before["completed"] == 16
    assert after["cancelled"] == before["cancelled"]
    # they shared the batch: requests joined while others were decoding
    assert after["engine"]["admitted_while_decoding"] > before["engine"].get("admitted_while_decoding", 0)


def test_errors(client, server):
    ok = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).encode()
    assert_openai_error(raw_post(server, b"{not json"), 400)
    assert_openai_error(raw_post(server, b"[1, 2]"), 400)
    assert_openai_error(raw_post(server, json.dumps({"model": MODEL}).encode()), 400, param="messages")
    assert_openai_error(raw_post(server, json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}).encode()),
                        400, param="temperature")
    assert_openai_error(raw_post(server, json.dumps({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}).encode()),
                        400, param="messages[0].role")
    with pytest.raises(openai.BadRequestError) as e:  # prompt over the context
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * CONTEXT}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    for field, value in (("response_format", {"type": "grammar"}),):  # would change the answer: refused, not ignored
        err = assert_openai_error(raw_post(server, json.dumps({"model": MODEL, "messages": MESSAGES, field: value}).encode()),
                                  400, code="unsupported_parameter", param=field)
        assert field in err["message"]
    neutral = {"logprobs": False, "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u1"}
    assert_openai_error(raw_post(server, json.dumps({"model": MODEL, "messages": MESSAGES, "top_logprobs": 21}).encode()),
                        400, param="top_logprobs")
    assert_openai_error(raw_post(server, json.dumps({"model": MODEL, "messages": MESSAGES, "logit_bias": {"x": 1}}).encode()),
                        400, param="logit_bias")
    assert raw_post(server, json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **neutral}).encode()).status_code == 200
    assert_openai_error(raw_post(server, ok, key=None), 401, code="invalid_api_key")
    assert_openai_error(raw_post(server, ok, key="sk-wrong"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert_openai_error(httpx.get(f"{server}/v1/nothing-here", headers={"authorization": f"Bearer {KEY}"}), 404)
    assert raw_post(server, ok).status_code == 200
    assert health(server)["status"] == "ok"  # open without a key


def test_disconnect_mid_stream_frees_the_slot(client, server):
    before = wait_idle(server)
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": CONTEXT, "temperature": 1.0}
    leave_mid_stream(server, "/v1/chat/completions", body)
    # the client is gone: the server cancels the request and the engine frees its slot
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
    # a non-streaming client that gives up is noticed too
    give_up_waiting(server, "/v1/chat/completions", body)
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 2
    # and the server still serves
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# --- tool calls: what a trained model generates, replayed through the app in-process -----------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}


@pytest.fixture(scope="module")
def replay(o200k_path):
    from fastapi.testclient import TestClient

    from gptoss_jax.decode import SamplingParams
    from gptoss_jax.harmony import ChatFormat
    from gptoss_jax.serving.server import create_app

    fmt, engine = ChatFormat(o200k_path), ReplayEngine()
    app = create_app(engine, fmt, MODEL, context=engine.context, default_params=SamplingParams(max_tokens=64))
    http = TestClient(app)
    return fmt, engine, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)


def model_output(fmt, text: str) -> list[int]:
    """A harmony completion as the model writes it after '<|start|>assistant'."""
    return fmt.tokenizer.encode(text, allowed_special="all")


TOOL_OUTPUT = ("<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant to=functions.get_weather"
               "<|channel|>commentary <|constrain|>json<|message|>{\"location\": \"東京\"}<|call|>")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_calls(replay, stream):
    fmt, engine, client = replay
    engine.outputs.append(model_output(fmt, TOOL_OUTPUT))
    messages = [{"role": "user", "content": "Weather in Tokyo?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], stream=stream)
    assert engine.prompts[-1] == fmt.render(messages, tools=[WEATHER])
    if stream:
        chunks = list(r)
        calls = {}
        for c in chunks:
            for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                call = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                call["arguments"] += tc.function.arguments or ""
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
        calls = [calls[i] for i in sorted(calls)]
    else:
        msg = r.choices[0].message
        calls = [{"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments} for tc in msg.tool_calls]
        reasoning, finish = msg.reasoning_content, r.choices[0].finish_reason
        assert msg.content is None
    assert finish == "tool_calls"
    assert reasoning == "Need the weather tool."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"location": "東京"})]
    assert calls[0]["id"].startswith("call_")

    # the client runs the tool and sends the result back: the prompt carries call and result in harmony
    engine.outputs.append(model_output(fmt, "<|channel|>final<|message|>Sunny.<|return|>"))
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function", "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"sky\": \"clear\"}"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert engine.prompts[-1] == fmt.render(history, tools=[WEATHER])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Sunny.", "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings(replay, stream):
    fmt, engine, client = replay
    engine.outputs.append(model_output(fmt, "<|channel|>final<|message|>Hello world. Goodbye world.<|return|>"))
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=["bye", "ld."], stream=stream)
    if stream:
        chunks = list(r)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert (content, finish) == ("Hello wor", "stop")
