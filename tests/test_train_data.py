"""Training data: harmony rendering and the assistant loss mask (checked against openai-harmony's own
rendering), bad records, packing, deterministic streams, config validation."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from train import data
from train.config import TrainConfigError, from_dict, load
from train.cli import parse_overrides


@pytest.fixture(scope="module")
def enc(o200k_path):
    return data.harmony_encoding(os.path.dirname(o200k_path))


def _sample(enc, messages, include_analysis=False):
    return data.render(enc, data.harmony_messages({"messages": messages}, "x:1"), include_analysis, "x:1")


def _completion(enc, prefix_msgs):
    """Tokens of harmony's completion prompt for the conversation so far (ends with <|start|>assistant)."""
    import openai_harmony as oh

    return enc.render_conversation_for_completion(oh.Conversation.from_messages(prefix_msgs), oh.Role.ASSISTANT)


def test_mask_is_exactly_the_assistant_completion(enc):
    """Single turn with reasoning: with include_analysis the trained tokens are everything harmony's
    training render adds after the completion prompt; without it, only the final message."""
    import openai_harmony as oh

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "thinking": "Add them.", "content": "4"}]
    hm = data.harmony_messages({"messages": msgs}, "x:1")
    full = enc.render_conversation_for_training(oh.Conversation.from_messages(hm),
                                                oh.RenderConversationConfig(auto_drop_analysis=False))
    prompt = _completion(enc, hm[:-2])
    assert full[:len(prompt)] == prompt
    s = _sample(enc, msgs, include_analysis=True)
    assert s.tokens.tolist() == full
    assert not s.mask[:len(prompt)].any() and s.mask[len(prompt):].all()
    assert enc.decode(full[len(prompt):]) == ("<|channel|>analysis<|message|>Add them.<|end|>"
                                              "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    s = _sample(enc, msgs, include_analysis=False)
    final = enc.render(hm[-1])
    assert enc.decode(s.tokens[s.mask].tolist()) == enc.decode(final[:-1]) + "<|return|>"
    assert s.mask[-len(final):].all() and s.mask.sum() == len(final)
    # the developer instructions carry the system message, after harmony's default system message
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>" in enc.decode(full)


def test_mask_multi_turn_follows_harmonys_dropped_analysis(enc):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "thinking": "greet", "content": "Hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "thinking": "wave", "content": "Bye"}]
    hm = data.harmony_messages({"messages": msgs}, "x:1")
    s = _sample(enc, msgs, include_analysis=True)
    text = enc.decode(s.tokens.tolist())
    assert "greet" not in text and "wave" in text  # earlier turns' reasoning is dropped, the last turn's kept
    spans, cur = [], []
    for t, m in zip(s.tokens.tolist(), s.mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(enc.decode(cur))
            cur = []
    spans.append(enc.decode(cur))
    assert spans == ["<|channel|>final<|message|>Hello<|end|>",
                     "<|channel|>analysis<|message|>wave<|end|><|start|>assistant<|channel|>final<|message|>Bye<|return|>"]
    # the second turn's trained tokens are exactly what follows harmony's completion prompt for it
    # (the history as harmony renders it for inference: the first turn's analysis dropped)
    import openai_harmony as oh

    prompt = enc.render_conversation_for_completion(oh.Conversation.from_messages(hm[:-2]), oh.Role.ASSISTANT)
    assert "greet" not in enc.decode(prompt)
    assert s.tokens[:len(prompt)].tolist() == prompt and s.mask[len(prompt):].all()


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 0: missing 'role'"),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"text": "hi"}', "'messages' list"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "%s"}]}' % ("word " * 300),
     "longer than data.sequence_length + 1 = 129"),
])
def test_bad_records_name_file_line_and_reason(tmp_path, enc, line, reason):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_samples([str(path)], enc, include_analysis=False, sequence_length=128, vocab_size=201088)
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value)


def test_tokens_outside_the_vocabulary_are_rejected(tmp_path, enc):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    with pytest.raises(data.DataError, match=r"d.jsonl:1: token id 20\d+ is outside the model's vocabulary \(1024"):
        data.load_samples([str(path)], enc, include_analysis=False, sequence_length=128, vocab_size=1024)


def _fake(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [data.Sample(rng.integers(1, 1000, n).astype(np.int32), rng.random(n) < 0.5, f"f:{i}")
            for i, n in enumerate(lengths)]


def test_packing_keeps_samples_whole_with_own_positions_and_segments():
    samples = _fake([5, 9, 4, 12, 3])
    rows = data.pack(samples, 16)
    # greedy: [4, 8] pairs -> 12; +3 -> 15; 11 starts row 2; +2 -> 13
    assert rows["segment_ids"].tolist()[0] == [1] * 4 + [2] * 8 + [3] * 3 + [0]
    assert rows["positions"][0].tolist() == list(range(4)) + list(range(8)) + list(range(3)) + [-1]
    for s, (r, start) in zip(samples, [(0, 0), (0, 4), (0, 12), (1, 0), (1, 11)]):
        n = len(s.tokens) - 1
        np.testing.assert_array_equal(rows["tokens"][r, start:start + n], s.tokens[:-1])
        np.testing.assert_array_equal(rows["targets"][r, start:start + n], s.tokens[1:])
        np.testing.assert_array_equal(rows["mask"][r, start:start + n], s.mask[1:])
    assert not rows["mask"][rows["segment_ids"] == 0].any()
    assert len(data.pack(samples, 16, packing=False)["tokens"]) == 5


def test_stream_is_deterministic_and_resumable():
    samples = _fake([6, 7, 3, 9, 5, 4, 8, 2, 6])
    a = data.Stream(samples, 12, packing=True, shuffle=True, seed=3)
    run = [a.take(3) for _ in range(6)]  # crosses several epochs
    b = data.Stream(samples, 12, packing=True, shuffle=True, seed=3)
    for _ in range(2):
        b.take(3)
    c = data.Stream(samples, 12, packing=True, shuffle=True, seed=3, position=data.Position(**vars(b.position)))
    for want in run[2:]:
        got = c.take(3)
        for f in data.FIELDS:
            np.testing.assert_array_equal(got[f], want[f])
    other = data.Stream(samples, 12, packing=True, shuffle=True, seed=4).take(3)
    assert not np.array_equal(other["tokens"], run[0]["tokens"])
    assert a.position.epoch >= 2  # epochs reshuffle


def test_config_file_overrides_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('checkpoint = "ck"\n[data]\ntrain = ["a.jsonl"]\n[lora]\nrank = 4\n')
    cfg = load(path, parse_overrides(["lora.alpha=8"], ["--optimizer.learning_rate", "2e-4", "--mesh=data=2",
                                                         "--set", "data.eval=['b.jsonl']"]))
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optimizer.learning_rate, cfg.mesh, cfg.data.eval) == \
        (4, 8.0, 2e-4, "data=2", ["b.jsonl"])
    for bad, field in [({"lora": {"rank": 0}}, "lora.rank"), ({"mode": "qlora"}, "mode"),
                       ({"lora": {"rnak": 2}}, "lora.rnak"), ({"steps": "many"}, "steps"),
                       ({"data": {"train": []}}, "data.train"), ({"lora": {"targets": ["up"]}}, "lora.targets")]:
        d = {"checkpoint": "ck", "data": {"train": ["a.jsonl"]}}
        for k, v in bad.items():
            d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
        with pytest.raises(TrainConfigError, match=f"field '{field}'"):
            from_dict(d, "c.toml")


@pytest.mark.parametrize("record_date", [None, "2026-01-15"])
def test_training_prompt_equals_what_serve_renders(enc, o200k_path, record_date):
    """The tokens a training sample conditions the answer on are exactly the prompt ``serve`` builds for
    the same messages (same renderer: system message with reasoning effort and Current date:)."""
    from gptoss_jax.serving.prompts import Preparer

    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris", "thinking": "Easy."},
            {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome"}]
    record = {"messages": msgs} if record_date is None else {"messages": msgs, "date": record_date}
    sample = data.render(enc, data.harmony_messages(record, "x:1"), False, "x:1")
    start = int(np.flatnonzero(~sample.mask).max()) + 1  # the last trained run: the last assistant turn
    prompt = sample.tokens[:start].tolist()  # up to its <|start|>assistant
    preparer = Preparer(o200k_path, context=4096, reasoning_effort="medium")
    body = {"model": "m", "messages": [{k: v for k, v in m.items() if k != "thinking"} for m in msgs[:-1]]}
    if record_date is None:
        _, served = preparer.prepare_chat(json.dumps(body).encode())
    else:  # the API has no date field; serve's renderer with the same date
        served = preparer.fmt.render(body["messages"], reasoning_effort="medium", date=record_date)
    assert prompt == served
    assert "Current date:" in preparer.fmt.tokenizer.decode(prompt)
