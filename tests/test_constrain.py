"""Constrained decoding: the grammars of tool_choice required / named and response_format json_schema
checked against llguidance directly (what the mask lets through), the packed mask against the sampler,
and a real `gptoss-jax serve` on random weights driven with the openai client, whose outputs the mask
forces to be a valid tool call / schema-valid JSON whatever the weights."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import openai
import pytest

from gptoss_jax.decode.sampling import SlotSampling, mask_words, sample
from gptoss_jax.serving.constrain import Grammars, json_grammar, tool_grammar
from tests.serving import KEY, MODEL, health, running_server

V = 201088
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
             "required": ["zone"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def grammars(o200k_path):
    return Grammars(o200k_path, V)


@pytest.fixture(scope="module")
def enc(o200k_path):
    from gptoss_jax.tokenizer import load_tokenizer

    return load_tokenizer(o200k_path)


def allowed(c) -> np.ndarray:
    row = np.zeros(mask_words(V), np.int32)
    c.fill(row)
    return np.unpackbits(row.view(np.uint8), bitorder="little")[:V].astype(bool)


def walk(grammars, grammar, text, enc) -> list[bool]:
    c = grammars.constraint(grammar)
    ok = []
    for t in enc.encode(text, allowed_special="all"):
        ok.append(bool(allowed(c)[t]))
        if not ok[-1] or not c.advance(t):
            break
    return ok


@pytest.mark.slow
def test_grammars_accept_valid_and_refuse_invalid(grammars, enc):
    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","days":3}<|call|>'
    g = tool_grammar(TOOLS, ["get_weather"], 64)
    assert all(walk(grammars, g, call, enc))
    assert all(walk(grammars, g, "<|channel|>analysis<|message|>think<|end|><|start|>assistant" + call, enc))
    assert not all(walk(grammars, g, call.replace('"Paris"', '"Rome"'), enc))
    assert not all(walk(grammars, g, call.replace("get_weather", "get_time"), enc))
    assert not all(walk(grammars, g, "<|channel|>final<|message|>hi<|return|>", enc))
    both = tool_grammar(TOOLS, ["get_weather", "get_time"], 64)
    assert all(walk(grammars, both, call.replace("get_weather", "get_time").replace(
        '{"city":"Paris","days":3}', '{"zone":"UTC"}'), enc))
    j = json_grammar(SCHEMA, 64)
    assert all(walk(grammars, j, '<|channel|>final<|message|>{"city":"Tokyo","days":9}<|return|>', enc))
    assert not all(walk(grammars, j, '<|channel|>final<|message|>{"city":"Tokyo","days":10}<|return|>', enc))
    assert not all(walk(grammars, j, '<|channel|>final<|message|>{"city": "Tokyo","days":1}<|return|>', enc))  # compact


def test_sampler_mask_only_constrains_its_rows():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 100)), jnp.float32)
    mask = np.full((3, mask_words(100)), -1, np.int32)
    mask[1] = 0
    mask[1, 1] = 1 << 7  # token 39 only
    mask[2] = 0
    mask[2, 0] = (1 << 3) | (1 << 5)
    for temp in (0.0, 1.0):
        p = SlotSampling(jnp.full(3, temp), jnp.zeros(3, jnp.int32), jnp.ones(3), jnp.zeros((3, 2), jnp.uint32))
        out = np.asarray(sample(logits, p, jnp.zeros(3, jnp.int32), allowed=jnp.asarray(mask)))
        assert out[1] == 39 and out[2] in (3, 5)
        if temp == 0:
            assert out[0] == int(jnp.argmax(logits[0])) and out[2] == (3 if logits[2, 3] > logits[2, 5] else 5)


@pytest.mark.slow
def test_server_tool_choice_and_json_schema(tmp_path, o200k_path):
    with running_server(tmp_path, o200k_path, "--prefix-cache-blocks", "32") as (url, _, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
        msgs = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
        for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
            r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=choice,
                                               max_tokens=80, temperature=0)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls", c
            call = c.message.tool_calls[0].function
            assert call.name == name or (name is None and call.name in ("get_weather", "get_time"))
            args = json.loads(call.arguments)
            if call.name == "get_weather":
                assert args["city"] in ("Paris", "Tokyo") and 1 <= args["days"] <= 9 and set(args) == {"city", "days"}
            else:
                assert args in ({"zone": "UTC"}, {"zone": "CET"})
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=80, temperature=0.7, seed=3,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "w", "schema": SCHEMA}})
        out = json.loads(r.choices[0].message.content)
        assert out["city"] in ("Paris", "Tokyo") and 1 <= out["days"] <= 9
        plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
        assert plain.choices[0].finish_reason in ("stop", "length")
        again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
        assert again.choices[0].message.content == plain.choices[0].message.content
        stats = health(url)["engine"]["prefix_cache"]  # the tool requests share a prompt, as do the plain ones
        assert stats["hit_blocks"] > 0 and 0 < stats["hit_rate"] < 1, stats
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=4,
                                           tool_choice={"type": "function", "function": {"name": "nope"}})
