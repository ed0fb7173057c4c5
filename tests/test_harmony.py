"""Harmony chat format: rendered prompts equal openai-harmony's token for token; generated ids parse into
reasoning / content / tool calls as openai-harmony parses them, incrementally."""
from __future__ import annotations

import json
import random

import openai_harmony as oh
import pytest

from gptoss_jax.harmony import ChatFormat, ChatFormatError
from gptoss_jax.tokenizer import CALL, END, RETURN

DATE = "2025-08-05"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
ARGS = json.dumps({"location": "San Francisco"})


@pytest.fixture(scope="module")
def fmt(o200k_path):
    return ChatFormat(o200k_path)


def system(effort=oh.ReasoningEffort.MEDIUM):
    content = oh.SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(DATE)
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def developer(instructions=None, tools=()):
    content = oh.DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools([oh.ToolDescription.new(
            t["function"]["name"], t["function"]["description"], parameters=t["function"]["parameters"]) for t in tools])
    return oh.Message.from_role_and_content(oh.Role.DEVELOPER, content)


def text(role, content, channel=None):
    m = oh.Message.from_role_and_content(role, content)
    return m.with_channel(channel) if channel else m


def tool_call(args=ARGS):
    return (text(oh.Role.ASSISTANT, args, "commentary").with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"))


# (our OpenAI-style request, the same conversation written directly in openai-harmony's types)
CONVERSATIONS = {
    "spec-5.3-worked-example": (
        dict(messages=[{"role": "user", "content": "What is 2 + 2?"}], reasoning_effort="low"),
        [system(oh.ReasoningEffort.LOW), text(oh.Role.USER, "What is 2 + 2?")]),
    "multi-turn-drops-old-analysis": (
        dict(messages=[{"role": "system", "content": "Always respond in riddles"},
                       {"role": "user", "content": "What is 2 + 2?"},
                       {"role": "assistant", "reasoning_content": "Easy: 4.", "content": "Four."},
                       {"role": "user", "content": [{"type": "text", "text": "And 3 + 3? "}, {"type": "text", "text": "日本語で"}]}],
             reasoning_effort="high"),
        [system(oh.ReasoningEffort.HIGH), developer("Always respond in riddles"), text(oh.Role.USER, "What is 2 + 2?"),
         text(oh.Role.ASSISTANT, "Easy: 4.", "analysis"), text(oh.Role.ASSISTANT, "Four.", "final"),
         text(oh.Role.USER, "And 3 + 3? 日本語で")]),
    "tools-call-and-result": (
        dict(messages=[{"role": "developer", "content": "Use tools."},
                       {"role": "user", "content": "Weather in SF? 🌁"},
                       {"role": "assistant", "reasoning_content": "Need the tool.", "content": None,
                        "tool_calls": [{"id": "call_1", "type": "function",
                                        "function": {"name": "get_weather", "arguments": ARGS}}]},
                       {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'}],
             tools=[WEATHER]),
        [system(), developer("Use tools.", [WEATHER]), text(oh.Role.USER, "Weather in SF? 🌁"),
         text(oh.Role.ASSISTANT, "Need the tool.", "analysis"), tool_call(),
         oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp_c": 18}')
         .with_recipient("assistant").with_channel("commentary")]),
    "tools-only-no-instructions": (
        dict(messages=[{"role": "user", "content": "  spaces\n\n\tand tabs  "}], tools=[WEATHER], reasoning_effort="low"),
        [system(oh.ReasoningEffort.LOW), developer(None, [WEATHER]), text(oh.Role.USER, "  spaces\n\n\tand tabs  ")]),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_equals_openai_harmony(fmt, name):
    request, messages = CONVERSATIONS[name]
    expected = fmt.encoding.render_conversation_for_completion(oh.Conversation.from_messages(messages), oh.Role.ASSISTANT)
    ours = fmt.render(date=DATE, **request)
    assert ours == expected
    assert fmt.tokenizer.encode(fmt.tokenizer.decode(ours), allowed_special="all") == ours


def test_worked_example_layout(fmt):
    """Spec 5.3: the prompt ends with <|start|>assistant and carries the date and effort in the system message."""
    ids = fmt.render([{"role": "user", "content": "What is 2 + 2?"}], reasoning_effort="low", date=DATE)
    decoded = fmt.tokenizer.decode(ids)
    assert decoded.startswith("<|start|>system<|message|>You are ChatGPT")
    assert f"Current date: {DATE}\n\nReasoning: low\n\n# Valid channels" in decoded
    assert decoded.endswith("<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant")


def completion(fmt, messages, stop=True):
    """What the model would generate after '<|start|>assistant', rendered by openai-harmony."""
    ids = []
    for m in messages:
        ids += fmt.encoding.render(m)
    ids = ids[2:]  # the prompt already ends with <|start|>assistant
    if ids[-1] == END:  # openai-harmony renders history; the model ends its answer with <|return|>
        ids[-1] = RETURN
    return ids if stop else ids[:-1]


OUTPUTS = {
    "reasoning-then-final": [text(oh.Role.ASSISTANT, "The user asks 2+2. 答えは4 🎉", "analysis"),
                             text(oh.Role.ASSISTANT, "2 + 2 = **4**.\n\n```py\nprint(4)\n```", "final")],
    "tool-call": [text(oh.Role.ASSISTANT, "Call the weather tool.", "analysis"), tool_call()],
    "preamble-two-calls": [text(oh.Role.ASSISTANT, "Checking both cities.", "commentary"), tool_call(),
                           tool_call(json.dumps({"location": "東京"}))],
    "final-only": [text(oh.Role.ASSISTANT, "Hi", "final")],
}


def expected_output(fmt, tokens):
    """openai-harmony's own parse, grouped the way our parser reports it."""
    reasoning, content, calls = "", "", []
    for m in fmt.encoding.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT):
        body = "".join(c.text for c in m.content)
        if m.recipient:
            calls.append((m.recipient.removeprefix("functions."), body))
        elif m.channel == "analysis":
            reasoning += body
        else:
            content += body
    return reasoning, content, calls


@pytest.mark.parametrize("name", OUTPUTS)
@pytest.mark.parametrize("stop", [True, False], ids=["with-stop-token", "cut-before-stop"])
def test_parse_equals_openai_harmony(fmt, name, stop):
    tokens = completion(fmt, OUTPUTS[name], stop)
    assert tokens[-1] in (RETURN, CALL) or not stop
    parser = fmt.parser()
    deltas = [d for t in tokens for d in parser.feed(t)] + parser.finish()
    out = parser.output
    assert (out.reasoning, out.content, [(c.name, c.arguments) for c in out.tool_calls]) == \
        expected_output(fmt, completion(fmt, OUTPUTS[name]))
    # the streamed pieces add up to the same result
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == out.reasoning
    assert "".join(d.text for d in deltas if d.kind == "content") == out.content
    starts = [d for d in deltas if d.kind == "tool_call"]
    assert [(d.index, d.call.name, d.call.id) for d in starts] == [(i, c.name, c.id) for i, c in enumerate(out.tool_calls)]
    for i, call in enumerate(out.tool_calls):
        assert "".join(d.text for d in deltas if d.kind == "arguments" and d.index == i) == call.arguments
    assert len({c.id for c in out.tool_calls}) == len(out.tool_calls)
    assert fmt.parse(tokens).content == out.content


def test_output_outside_the_format_is_plain_content(fmt):
    """Random weights generate arbitrary ids: nothing is lost, nothing raises."""
    rng = random.Random(0)
    for trial in range(20):
        tokens = [rng.randrange(fmt.tokenizer.n_vocab) for _ in range(rng.randrange(1, 120))]
        out = fmt.parse(tokens)
        assert out.reasoning + out.content + "".join(c.arguments for c in out.tool_calls)
    tokens = fmt.tokenizer.encode("plain text with no harmony header at all, " * 10)
    assert fmt.parse(tokens).content == fmt.tokenizer.decode(tokens)
    # a well-formed message followed by a broken one: the message parses, the rest is kept as text
    tokens = completion(fmt, OUTPUTS["final-only"]) + fmt.tokenizer.encode("oops")
    assert fmt.parse(tokens).content == "Hi" + "oops"


def test_cut_inside_a_header_after_a_message(fmt):
    """Generation stopped by max_tokens: a partial header is dropped, partial content kept."""
    analysis = completion(fmt, OUTPUTS["reasoning-then-final"][:1])
    header_cut = analysis + fmt.encoding.encode("<|start|>assistant<|channel|>fin", allowed_special="all")
    assert fmt.parse(header_cut) == fmt.parse(analysis)
    assert fmt.parse(header_cut).content == "" and fmt.parse(header_cut).reasoning.startswith("The user asks")
    tokens = completion(fmt, OUTPUTS["reasoning-then-final"])
    full, cut = fmt.parse(tokens).content, fmt.parse(tokens[:-4]).content
    assert cut and full.startswith(cut) and cut != full


@pytest.mark.parametrize("request_, error", [
    (dict(messages=[{"role": "robot", "content": "x"}]), r"messages\[0\]\.role"),
    (dict(messages=[]), "messages: expected a non-empty list"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), r"messages\[0\]\.content\[0\]"),
    (dict(messages=[{"role": "user", "content": 5}]), r"messages\[0\]\.content"),
    (dict(messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}]), r"messages\[0\]: tool_call_id 'nope'"),
    (dict(messages=[{"role": "user", "content": "x"}], reasoning_effort="max"), "reasoning_effort"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "web"}]), r"tools\[0\]"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=[{"function": {"name": "f", "parameters": 1}}]),
     r"tools\[0\]\.function\.parameters"),
    (dict(messages=[{"role": "assistant", "tool_calls": 3}]), r"messages\[0\]\.tool_calls: expected a list"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"id": [], "function": {"name": "f"}}]}]),
     r"messages\[0\]\.tool_calls\[0\]\.id"),
    (dict(messages=[{"role": "tool", "tool_call_id": {}, "content": "x"}]), r"messages\[0\]: name and tool_call_id"),
    (dict(messages=[{"role": "assistant", "reasoning_content": ["x"]}]), r"messages\[0\]\.reasoning_content"),
])
def test_bad_requests_name_the_field(fmt, request_, error):
    with pytest.raises(ChatFormatError, match=error):
        fmt.render(**request_)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_spliced_texts_equal_openai_harmony(fmt, name, monkeypatch):
    """Every message text tokenized by encode_bounded and spliced in gives harmony's own ids."""
    import gptoss_jax.harmony as harmony

    request, messages = CONVERSATIONS[name]
    expected = fmt.render(date=DATE, **request)
    monkeypatch.setattr(harmony, "HARMONY_MAX_PIECE", 0)
    assert fmt.render(date=DATE, **request) == expected


def test_long_runs_render_in_linear_time(fmt):
    """A run harmony takes quadratic time on (4,000 'a': ~10 ms; 100,000: ~5 s) gives harmony's ids, and a
    100,000-character run renders fast."""
    import time

    messages = [{"role": "user", "content": "see: " + "a" * 4000 + " end"}]
    raw = fmt.encoding.render_conversation_for_completion(fmt.conversation(messages, date=DATE), oh.Role.ASSISTANT)
    assert fmt.render(messages, date=DATE) == raw
    t0 = time.perf_counter()
    ids = fmt.render([{"role": "user", "content": "b" * 100_000}, {"role": "assistant", "content": "!" * 100_000}])
    assert time.perf_counter() - t0 < 2
    assert fmt.tokenizer.decode(ids).count("b" * 100_000) == 1


def test_long_runs_in_instructions_are_refused(fmt):
    with pytest.raises(ChatFormatError, match=r"messages\[0\].content: a run of 5000 characters"):
        fmt.render([{"role": "system", "content": "x" * 5000}, {"role": "user", "content": "hi"}])
