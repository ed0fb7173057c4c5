"""The Responses API (``/v1/responses``) with the official ``openai`` client: against a real
``gptoss-jax serve`` process on a random tiny-harmony checkpoint (plain, streamed, previous_response_id,
errors), and, for reasoning items and function calls (which need a trained model), scripted harmony
output replayed through the same app in-process."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serving import (KEY, MODEL, ReplayEngine, ReplayRequest, leave_mid_stream, openai_client, running_server,
                           wait_idle)

QUESTION = "What is 2 + 2?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, o200k_path):
    with running_server(tmp_path_factory.mktemp("serve"), o200k_path, "--responses-store", "4") as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def fmt(o200k_path):
    from gptoss_jax.harmony import ChatFormat

    return ChatFormat(o200k_path)


def item_text(item) -> str:
    if item.type == "function_call":
        return item.arguments
    return "".join(part.text for part in item.content or [])


def test_response(client, fmt):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=6, temperature=0,
                                reasoning={"effort": "low"}, metadata={"k": "v"})
    assert (r.object, r.model, r.metadata) == ("response", MODEL, {"k": "v"}) and r.id.startswith("resp_")
    assert r.reasoning.effort == "low" and r.temperature == 0 and r.store
    assert r.status in ("completed", "incomplete")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == len(fmt.render([{"role": "user", "content": QUESTION}], reasoning_effort="low"))
    assert 1 <= r.usage.output_tokens <= 6 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.output and {i.type for i in r.output} <= {"reasoning", "message", "function_call"}
    again = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=6, temperature=0,
                                    reasoning={"effort": "low"})
    assert [item_text(i) for i in again.output] == [item_text(i) for i in r.output]  # greedy is deterministic
    assert client.responses.retrieve(r.id).output_text == r.output_text


def check_stream(events) -> object:
    """The event sequence is well formed; returns the final response, whose items the deltas spell."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    final, texts, open_items = events[-1].response, {}, set()
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert not open_items and e.output_index == len(texts)
            open_items.add(e.item.id)
            texts[e.item.id] = ""
        elif e.type == "response.output_item.done":
            open_items.remove(e.item.id)
            assert e.item == final.output[e.output_index]
        elif e.type.endswith(".delta"):
            assert e.item_id in open_items
            texts[e.item_id] += e.delta
        elif e.type.endswith("_text.done") or e.type.endswith("arguments.done"):
            assert (e.text if hasattr(e, "text") else e.arguments) == texts[e.item_id]
    assert not open_items
    assert [texts[i.id] for i in final.output] == [item_text(i) for i in final.output]
    return final


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL, input=QUESTION, max_output_tokens=8, temperature=0)
    whole = client.responses.create(**kwargs)
    final = check_stream(list(client.responses.create(**kwargs, stream=True)))
    assert [item_text(i) for i in final.output] == [item_text(i) for i in whole.output]
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert final.status == whole.status


def test_previous_response_id(client, fmt):
    from gptoss_jax.serving.responses import items_to_messages

    first = client.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=4,
                                    temperature=0)
    second = client.responses.create(model=MODEL, input=[{"role": "user", "content": "And then?"}],
                                     previous_response_id=first.id, max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    earlier = [{"role": "user", "content": "Hi"}] + items_to_messages([i.model_dump() for i in first.output])
    # the earlier turn is in the prompt; its instructions do not carry over (as in OpenAI's API)
    expected = fmt.render(earlier + [{"role": "user", "content": "And then?"}])
    assert second.usage.input_tokens == len(expected)
    assert first.usage.input_tokens == len(fmt.render([{"role": "developer", "content": "Be brief."},
                                                       {"role": "user", "content": "Hi"}]))
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_store(client):
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1, temperature=0, store=False)
    assert unstored.status == "incomplete" and unstored.incomplete_details.reason == "max_output_tokens"
    assert unstored.usage.output_tokens == 1 and unstored.output[-1].status == "incomplete"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="Hi", previous_response_id=unstored.id)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"
    # --responses-store 4: the least recently used is dropped
    ids = [client.responses.create(model=MODEL, input="Hi", max_output_tokens=1).id for _ in range(5)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert client.responses.retrieve(ids[-1]).id == ids[-1]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
          "required": ["city"], "additionalProperties": False}


def test_constrained(client):
    """A named tool_choice (Responses' flat form) and text.format json_schema take chat's constrained path."""
    tools = [{"type": "function", "name": "get_weather", "parameters": SCHEMA}]
    r = client.responses.create(model=MODEL, input="Weather?", tools=tools, max_output_tokens=60, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"})
    call = r.output[-1]
    assert (call.type, call.name, json.loads(call.arguments)["city"] in ("Paris", "Tokyo")) == (
        "function_call", "get_weather", True)
    r = client.responses.create(model=MODEL, input="Weather?", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}})
    assert json.loads(r.output_text)["city"] in ("Paris", "Tokyo") and r.status == "completed"


@pytest.mark.parametrize("fields, status, code, param", [
    ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
    ({"previous_response_id": "resp_nope"}, 400, "previous_response_not_found", "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, 400, "unsupported_parameter", "tools[0].type"),
    ({"background": True}, 400, "unsupported_parameter", "background"),
    ({"include": ["reasoning.encrypted_content"]}, 400, "unsupported_parameter", "include"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "unsupported_parameter", "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "unsupported_parameter", "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, 400, None, "input[0].role"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, 400, None, "input"),
    ({"input": [5]}, 400, None, "input"),
    ({"max_output_tokens": 0}, 400, None, "max_output_tokens"),
    ({"reasoning": {"effort": "extreme"}}, 400, None, "reasoning.effort"),
    ({"tool_choice": {"type": "file_search"}}, 400, "unsupported_parameter", "tool_choice"),
])
def test_errors(server, client, fields, status, code, param):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, **fields}
    r = httpx.post(f"{server}/v1/responses", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param) and err["message"]
    assert httpx.post(f"{server}/v1/responses", json=body, timeout=60).status_code == 401  # no key


def test_stream_client_leaves(server):
    before = wait_idle(server)
    body = {"model": MODEL, "input": "Tell me a story.", "max_output_tokens": 300, "stream": True}
    leave_mid_stream(server, "/v1/responses", body, first="event: response.created")
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1


# --- reasoning and function calls: what a trained model generates, replayed through the app in-process ----

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
WEATHER_CHAT = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}
TOOL_OUTPUT = ("<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant to=functions.get_weather"
               "<|channel|>commentary <|constrain|>json<|message|>{\"location\": \"東京\"}<|call|>")


@pytest.fixture(scope="module")
def replay(fmt):
    from fastapi.testclient import TestClient

    from gptoss_jax.decode import SamplingParams
    from gptoss_jax.serving.server import create_app, render_pool

    engine = ReplayEngine()
    renderer = render_pool(fmt, engine.context, workers=1)
    app = create_app(engine, fmt, MODEL, context=engine.context, default_params=SamplingParams(max_tokens=64),
                     renderer=renderer)
    with TestClient(app) as http:
        yield engine, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
    renderer.close()


def scripted(fmt, text: str) -> list[int]:
    return fmt.tokenizer.encode(text, allowed_special="all")


def respond(client, stream: bool, **kwargs):
    if not stream:
        return client.responses.create(model=MODEL, **kwargs)
    return check_stream(list(client.responses.create(model=MODEL, stream=True, **kwargs)))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reasoning_and_message(replay, fmt, stream):
    engine, client = replay
    engine.outputs.append(scripted(fmt, "<|channel|>analysis<|message|>Two plus two.<|end|>"
                                        "<|start|>assistant<|channel|>final<|message|>4<|return|>"))
    r = respond(client, stream, input=QUESTION, instructions="Answer in digits.", reasoning={"effort": "high"})
    assert engine.prompts[-1] == fmt.render([{"role": "developer", "content": "Answer in digits."},
                                             {"role": "user", "content": QUESTION}], reasoning_effort="high")
    assert [i.type for i in r.output] == ["reasoning", "message"] and r.status == "completed"
    assert (r.reasoning.effort, r.instructions) == ("high", "Answer in digits.")
    assert r.output[0].content[0].text == "Two plus two." and r.output[0].id.startswith("rs_")
    assert r.output_text == "4" and r.output[1].role == "assistant" and r.output[1].status == "completed"
    assert r.usage.output_tokens_details.reasoning_tokens == len(fmt.tokenizer.encode("Two plus two."))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_function_call_round_trip(replay, fmt, stream):
    engine, client = replay
    engine.outputs.append(scripted(fmt, TOOL_OUTPUT))
    r = respond(client, stream, input="Weather in Tokyo?", tools=[WEATHER])
    assert r.reasoning.effort == "medium"  # the server's default
    user = {"role": "user", "content": "Weather in Tokyo?"}
    assert engine.prompts[-1] == fmt.render([user], tools=[WEATHER_CHAT])
    assert [i.type for i in r.output] == ["reasoning", "function_call"] and r.status == "completed"
    call = r.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"location": "東京"})
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")

    # the client runs the tool and sends its output back: the prompt carries the call and its result
    engine.outputs.append(scripted(fmt, "<|channel|>final<|message|>Sunny.<|return|>"))
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "{\"sky\": \"clear\"}"}
    follow = respond(client, stream, input=[result], previous_response_id=r.id, tools=[WEATHER])
    history = [user, {"role": "assistant", "reasoning_content": "Need the weather tool.", "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "{\"sky\": \"clear\"}"}]
    assert engine.prompts[-1] == fmt.render(history, tools=[WEATHER_CHAT])
    assert follow.output_text == "Sunny." and follow.status == "completed"

    # the same turn with the items given back in full (stateless), and tool_choice "none" (no tools rendered)
    engine.outputs.append(scripted(fmt, "<|channel|>final<|message|>Sunny.<|return|>"))
    items = [user, *[i.model_dump(exclude_none=True) for i in r.output], result]
    respond(client, stream, input=items, tools=[WEATHER], tool_choice="none", store=False)
    assert engine.prompts[-1] == fmt.render(history)



def test_generation_failure(replay, fmt, monkeypatch):
    """A failure mid-generation: a 500 in OpenAI's shape, or, once a stream has started, an error event."""
    engine, client = replay

    class Failing(ReplayRequest):
        async def aiter(self):
            async for t in super().aiter():
                yield t
            self.finish_reason = "error"

    output = scripted(fmt, "<|channel|>final<|message|>Hi")
    monkeypatch.setattr(engine, "submit", lambda prompt, params: Failing(output))
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=MODEL, input="Hi")
    events = list(client.responses.create(model=MODEL, input="Hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-2].type == "response.output_text.delta" and events[-2].delta == "Hi"
    assert (events[-1].type, events[-1].code) == ("error", "server_error") and "generation failed" in events[-1].message


def test_sdk_stream_helper(replay, fmt):
    """The SDK's ``responses.stream`` rebuilds the response from our events (its accumulator checks them)."""
    engine, client = replay
    engine.outputs.append(scripted(fmt, TOOL_OUTPUT))
    with client.responses.stream(model=MODEL, input="Weather in Tokyo?", tools=[{**WEATHER, "strict": True}]) as s:
        deltas = [e.delta for e in s if e.type == "response.function_call_arguments.delta"]
        final = s.get_final_response()
    call = final.output[1]
    assert "".join(deltas) == call.arguments and call.parsed_arguments == {"location": "東京"}
    assert final.output[0].content[0].text == "Need the weather tool."
