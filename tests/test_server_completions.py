"""``POST /v1/completions`` (legacy text completions) on a real `gptoss-jax serve` process (float32, random
tiny-harmony checkpoint), driven with the official ``openai`` client: plain, token-id and batched
prompts, echo + logprobs against the checkpoint's own full-forward log-softmax, streaming, stop
strings, errors."""
from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from tests.serving import (CONTEXT, KEY, MODEL, ReplayRequest, assert_openai_error, give_up_waiting, leave_mid_stream,
                           openai_client, running_server, wait_idle)

PROMPT = "<|start|>user<|message|>The capital of France is"
#: float32 through three layers, chunked prefill against one full forward: the engine tests' bound
#: (tests/test_decode.py); log-softmax values here are ~12 (log 201088), float32 keeps ~1e-6 of them
ATOL = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory, o200k_path):
    """`gptoss-jax serve --dtype float32` in a subprocess; yields (base URL, checkpoint folder)."""
    tmp = tmp_path_factory.mktemp("serve")
    with running_server(tmp, o200k_path, "--dtype", "float32") as (url, _, _):
        yield url, tmp / MODEL


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def tokenizer(o200k_path):
    from gptoss_jax.tokenizer import load_tokenizer

    return load_tokenizer(o200k_path)


def post(server, body: dict):
    return httpx.post(f"{server}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60)


def test_completion(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-") and choice.index == 0
    assert choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT, allowed_special="all")) == 8  # 3 special tokens
    assert 1 <= r.usage.completion_tokens <= 6 and (choice.finish_reason == "stop" or r.usage.completion_tokens == 6)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    default = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)  # max_tokens 16, as OpenAI
    assert default.choices[0].text.startswith(choice.text)
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"


def test_token_ids_equal_text(client, tokenizer):
    """A prompt as token ids is the string's encoding (special tokens included); lists of prompts give
    n choices each, index = prompt index * n + j."""
    ids = tokenizer.encode(PROMPT, allowed_special="all")
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    r = client.completions.create(model=MODEL, prompt=[PROMPT, ids], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [text.choices[0].text] * 4
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 4 * text.usage.completion_tokens
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert one.choices[0].text == text.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=[ids, PROMPT], max_tokens=6, temperature=0, stream=True))
    texts = {}
    for c in chunks:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert texts == {0: text.choices[0].text, 1: text.choices[0].text}


@pytest.mark.parametrize("text", ["plain text", "<|start|>user<|message|>hi<|end|><|start|>assistant",
                                  "<|endofprompt|> is text, <|reserved_200100|> is not", "<|start", "a" * 3000 + " b"])
def test_encode_special_is_tiktokens_encode_all(tokenizer, text):
    from gptoss_jax.tokenizer import encode_special

    assert encode_special(tokenizer, text) == tokenizer.encode(text, allowed_special="all")


def greedy_reference(ckpt, prompt: list[int], steps: int):
    """Greedy continuation of ``prompt`` by a full float32 forward of ``ckpt`` (no cache, one compile), and
    the float64 log-softmax rows of prompt + continuation."""
    import jax.numpy as jnp

    import gptoss_jax

    model = gptoss_jax.load(str(ckpt), dtype=jnp.float32)
    seq, width = list(prompt), 32
    for _ in range(steps + 1):
        tokens, mask = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        tokens[0, :len(seq)], mask[0, :len(seq)] = seq, 1
        logits = np.asarray(model.logits(tokens, mask))[0, :len(seq)].astype(np.float64)
        seq.append(int(logits[-1].argmax()))
    lsm = logits - logits.max(-1, keepdims=True)
    lsm -= np.log(np.exp(lsm).sum(-1, keepdims=True))
    return seq[len(prompt):-1], lsm


def test_echo_logprobs_are_the_models_log_softmax(client, served, tokenizer):
    """echo + logprobs=3, greedy: the prompt tokens come first (the first one's logprob null), then the
    generated ones; every logprob and top alternative equals the log-softmax of a full forward of the
    same checkpoint in this process; text_offset indexes the text. max_tokens 0 scores the prompt only."""
    from gptoss_jax.serving.completions import token_text

    ids = tokenizer.encode(PROMPT, allowed_special="all")
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=3)
    c, lp = r.choices[0], r.choices[0].logprobs
    assert c.text.startswith(PROMPT)
    generated, lsm = greedy_reference(served[1], ids, 4)
    seq = ids + generated[:len(lp.tokens) - len(ids)]
    assert lp.tokens == [token_text(tokenizer, t) for t in seq] and len(seq) >= len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(seq)):
        np.testing.assert_allclose(lp.token_logprobs[j], lsm[j - 1, seq[j]], atol=ATOL)
        top = np.argsort(lsm[j - 1])[::-1][:3]
        want = {token_text(tokenizer, int(t)): lsm[j - 1, t] for t in top}
        assert set(lp.top_logprobs[j]) == set(want) | {lp.tokens[j]}  # the top 3 and the token itself
        np.testing.assert_allclose([lp.top_logprobs[j][k] for k in want], list(want.values()), atol=ATOL)
    assert lp.text_offset == [len("".join(lp.tokens[:j])) for j in range(len(seq))]  # (all valid UTF-8 here)
    assert c.text == "".join(lp.tokens[:len(lp.tokens) - (c.finish_reason == "stop")])  # not the stop token
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    only = scored.choices[0]
    assert (only.text, only.finish_reason, scored.usage.completion_tokens) == (PROMPT, "length", 0)
    assert only.logprobs.tokens == lp.tokens[:len(ids)] and only.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(only.logprobs.token_logprobs[1:], lp.token_logprobs[1:len(ids)], atol=ATOL)


def test_streaming_equals_non_streaming(client, server):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=1234, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    parts = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in parts) == whole.choices[0].text
    assert [p.finish_reason for p in parts if p.finish_reason] == [whole.choices[0].finish_reason]
    streamed = [t for p in parts if p.logprobs for t in p.logprobs.tokens]
    assert streamed == whole.choices[0].logprobs.tokens
    assert [o for p in parts if p.logprobs for o in p.logprobs.text_offset] == whole.choices[0].logprobs.text_offset
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    wait_idle(server)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string(client, stream):
    """Greedy text cut before the first stop string, finish_reason "stop"."""
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert len(full) >= 4, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=["\x00never", stop],
                                  stream=stream)
    if stream:
        parts = [c.choices[0] for c in r if c.choices]
        text, finish = "".join(p.text for p in parts), parts[-1].finish_reason
    else:
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert (text, finish) == (full[:full.find(stop)], "stop")


def test_errors(client, server):
    base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1}
    for prompt in ("", [], [[]], [-1], [201088], [1, "a"], None, [True]):
        assert_openai_error(post(server, {**base, "prompt": prompt}), 400, param="prompt")
    with pytest.raises(openai.BadRequestError) as e:  # prompt over the context
        client.completions.create(model=MODEL, prompt="word " * CONTEXT)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert_openai_error(post(server, {**base, "prompt": list(range(CONTEXT))}), 400, code="context_length_exceeded")
    err = assert_openai_error(post(server, {**base, "prompt": "a" * 1_000_000}), 400, code="context_length_exceeded")
    assert "at least" in err["message"]  # refused by the byte bound, untokenized
    assert_openai_error(post(server, {**base, "prompt": [PROMPT] * 65, "n": 2}), 400, param="prompt")  # > 128 choices
    assert_openai_error(post(server, {**base, "logprobs": 6}), 400, param="logprobs")
    assert_openai_error(post(server, {**base, "logprobs": -1}), 400, param="logprobs")
    assert_openai_error(post(server, {**base, "stop": [str(i) for i in range(17)]}), 400, param="stop")
    for field, value in (("suffix", "tail"), ("best_of", 3)):  # would change the answer: refused, not ignored
        err = assert_openai_error(post(server, {**base, field: value}), 400, code="unsupported_parameter", param=field)
        assert field in err["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)
    assert e.value.code == "model_not_found"
    neutral = {"suffix": "", "best_of": 2, "n": 2, "user": "u1", "logprobs": False, "logit_bias": {"200006": -100},
               "presence_penalty": 0.5}
    assert post(server, {**base, **neutral}).status_code == 200
    assert_openai_error(httpx.post(f"{server}/v1/completions", content=json.dumps(base)), 401, code="invalid_api_key")
    wait_idle(server)


def test_disconnect_frees_the_slots(client, server):
    """A client that leaves (mid-stream, or a non-streaming one timing out) has its requests cancelled."""
    before = wait_idle(server)
    body = {"model": MODEL, "prompt": [PROMPT, PROMPT], "stream": True, "max_tokens": CONTEXT, "temperature": 1.0}
    leave_mid_stream(server, "/v1/completions", body)
    assert wait_idle(server)["cancelled"] == before["cancelled"] + 2
    give_up_waiting(server, "/v1/completions", body)
    assert wait_idle(server)["cancelled"] == before["cancelled"] + 4
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].finish_reason


class FixedRequest(ReplayRequest):
    """Stands in for an engine Request: fixed ids (each with logprob -1, itself its only alternative)."""

    def __init__(self, tokens, stop_ids=(200002,)):
        super().__init__(tokens)
        self.params = type("Params", (), {"stop_token_ids": stop_ids})
        self.logprobs, self.prompt_logprobs = [(-1.0, [t], [-1.0]) for t in tokens], None


@pytest.mark.parametrize("stops", [[], ["京 i"]], ids=["no-stop", "stop"])
def test_characters_split_over_tokens_come_out_whole(tokenizer, stops):
    """'東京 is' as one token per UTF-8 byte, then <|return|>: no piece holds a broken character, the stop
    token is not in the text (but in logprobs), logprobs name the lone bytes and offset them at their
    character."""
    import asyncio

    from gptoss_jax.serving.completions import TextChoice

    text = "東京 is"
    ids = [tokenizer.encode_single_token(bytes([b])) for b in text.encode()] + [200002]
    choice = TextChoice(0, FixedRequest(ids), tokenizer, stops, echo=None, logprobs=0)

    async def pieces():
        return [p async for p in choice.deltas()]

    got = asyncio.run(pieces())
    want = text[:text.find(stops[0])] if stops else text
    assert "".join(got) == choice.text == want and not any("\ufffd" in p for p in got)
    assert choice.finish_reason == "stop"
    assert choice.tokens == (len(ids) if not stops else 8)  # the stop string is complete at "i"
    lp = choice.logprobs_json()
    assert lp["tokens"][:3] == ["bytes:\\xe6", "bytes:\\x9d", "bytes:\\xb1"]
    assert lp["text_offset"] == [0, 0, 0, 1, 1, 1, 2, 3, 4, 5][:len(lp["tokens"])]
    # every token (the stop token too, as vLLM: one entry per counted token); a stop string: those before it
    assert lp["tokens"][3:] == (["bytes:\\xe4", "bytes:\\xba", "bytes:\\xac", " ", "i", "s", "<|return|>"]
                                if not stops else [])
    assert lp["top_logprobs"][0] == {"bytes:\\xe6": -1.0}
