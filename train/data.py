"""Chat data: JSONL conversations -> harmony tokens with an assistant loss mask -> packed rows.

A record is ``{"messages": [{"role": "system"|"developer"|"user"|"assistant", "content": str,
"thinking" | "reasoning_content": str (assistant, optional)}, ...], "date": str (optional),
"reasoning_effort": str (optional)}``. The conversation is built by the renderer serving uses
(:func:`gptoss_jax.harmony.conversation`), so a tuned model is served the prompt it was trained on:
leading system/developer messages become the harmony developer instructions and the harmony system
message (reasoning effort, ``Current date:``) comes first; an assistant message renders as an ``analysis`` message (its thinking)
followed by a ``final`` message (its content). As at inference, earlier turns' analysis messages are
dropped and the last turn's reasoning is kept; the conversation is then rendered by openai-harmony's
``render_conversation_for_training`` (the last message ending in ``<|return|>``). (harmony's own
``auto_drop_analysis`` drops every analysis message before the *first* final one, which would drop
the reasoning of a single-turn sample, so it is turned off.)

Loss mask: the tokens of every assistant message in the rendering (analysis messages only with
``include_analysis``), except the ``<|start|>assistant`` that opens an assistant turn (the prompt
supplies it). A sample of n tokens gives n-1 (input, target) pairs; packing concatenates samples into
rows of ``sequence_length`` pairs with per-sample positions and segment ids (attention never crosses
samples); pads have position -1, segment 0 and no loss.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from gptoss_jax import harmony

ROLES = ("system", "developer", "user", "assistant")
START, ASSISTANT = 200006, 173781  # <|start|>, "assistant"


class DataError(ValueError):
    """A data file or record is invalid; the message names the file, line and reason."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One rendered conversation: tokens [n] int32, loss mask [n] bool (True = a trained token)."""

    tokens: np.ndarray
    mask: np.ndarray
    where: str  # "file:line"


def harmony_encoding(encodings_dir: str = ""):
    """openai-harmony's gpt-oss encoding, read offline from ``encodings_dir``/o200k_base.tiktoken
    (default: ``$TIKTOKEN_ENCODINGS_BASE``). Never downloads."""
    folder = encodings_dir or os.environ.get("TIKTOKEN_ENCODINGS_BASE", "")
    if not folder or not os.path.isfile(os.path.join(folder, "o200k_base.tiktoken")):
        raise DataError(f"no o200k_base.tiktoken in {folder or '(unset)'}: set data.encodings_dir or "
                        f"TIKTOKEN_ENCODINGS_BASE to the folder holding it (nothing is downloaded)")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    import openai_harmony as oh

    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _text(value, where: str, what: str) -> str:
    """Message content: a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise DataError(f"{where}: {what} must be a string or a list of text parts, got {type(value).__name__}")


def harmony_messages(record, where: str, date: str | None = None) -> list:
    """Validate one record and build its harmony messages (system, developer, user/assistant...) with
    the renderer serving uses (:func:`gptoss_jax.harmony.conversation`): the system message carries the
    record's ``reasoning_effort`` (default medium, as ``serve``) and ``Current date:`` from the record's
    ``date``, else ``date``, else today (serving's rule)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise DataError(f"{where}: expected an object with a 'messages' list")
    messages = record["messages"]
    if not messages:
        raise DataError(f"{where}: empty conversation (no messages)")
    chat, seen_chat = [], False
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{at}: expected an object, got {type(m).__name__}")
        if "role" not in m:
            raise DataError(f"{at}: missing 'role'")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _text(m.get("content"), at, "'content'")
        if role in ("system", "developer"):
            if seen_chat:
                raise DataError(f"{at}: a {role} message must come before the user/assistant messages")
            chat.append({"role": role, "content": content})
            continue
        seen_chat = True
        if role == "user":
            chat.append({"role": "user", "content": content})
            continue
        thinking = _text(m.get("thinking", m.get("reasoning_content")), at, "'thinking'")
        if not thinking and not content:
            raise DataError(f"{at}: assistant message has neither content nor thinking")
        chat.append({"role": "assistant", "content": content, "reasoning_content": thinking})
    if not any(m["role"] == "assistant" for m in chat):
        raise DataError(f"{where}: no assistant message (nothing to train on)")
    options = {"date": record.get("date", date), "reasoning_effort": record.get("reasoning_effort", "medium")}
    for key, value in options.items():
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    try:
        return list(harmony.conversation(chat, date=options["date"] or None,
                                         reasoning_effort=options["reasoning_effort"]).messages)
    except harmony.ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None


def render(enc, messages: list, include_analysis: bool, where: str) -> Sample:
    """Harmony training tokens of ``messages`` and the assistant loss mask (see the module docstring).

    Each message's span is found by rendering it alone and matching it in order against the whole
    conversation's rendering.
    """
    import openai_harmony as oh

    last_user = max((i for i, m in enumerate(messages) if m.author.role == oh.Role.USER), default=-1)
    messages = [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_user)]
    tokens = enc.render_conversation_for_training(oh.Conversation.from_messages(messages),
                                                  oh.RenderConversationConfig(auto_drop_analysis=False))
    mask = np.zeros(len(tokens), bool)
    pos, prev_assistant = 0, False
    for i, msg in enumerate(messages):
        part = enc.render(msg)
        if i == len(messages) - 1 and tokens[pos:pos + len(part) - 1] == part[:-1] and pos + len(part) == len(tokens):
            pass  # the final message ends in <|return|> rather than <|end|>
        elif tokens[pos:pos + len(part)] != part:
            raise DataError(f"{where}: internal error: message {i} not found in harmony's rendering")
        is_assistant = msg.author.role == oh.Role.ASSISTANT
        if is_assistant and (include_analysis or msg.channel != "analysis"):
            mask[pos + (0 if prev_assistant else 2):pos + len(part)] = True
        prev_assistant = is_assistant
        pos += len(part)
    if pos != len(tokens):
        raise DataError(f"{where}: internal error: harmony's rendering has {len(tokens) - pos} unmatched tokens")
    return Sample(np.asarray(tokens, np.int32), mask, where)


def read_jsonl(path: str, enc, *, include_analysis: bool, max_tokens: int, vocab_size: int,
               date: str | None = None) -> list[Sample]:
    """All samples of one JSONL file; any bad record stops with ``path:line: reason``."""
    samples = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read data file ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            sample = render(enc, harmony_messages(record, where, date), include_analysis, where)
            n = len(sample.tokens)
            if n > max_tokens:
                raise DataError(f"{where}: sample is {n} tokens, longer than data.sequence_length + 1 = {max_tokens}")
            if sample.tokens.max() >= vocab_size:
                raise DataError(f"{where}: token id {int(sample.tokens.max())} is outside the model's vocabulary "
                                f"({vocab_size} tokens)")
            if not sample.mask[1:].any():
                raise DataError(f"{where}: no trained tokens (the assistant has only analysis and "
                                f"data.include_analysis is false)")
            samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no records")
    return samples


def load_samples(paths: list[str], enc, *, include_analysis: bool, sequence_length: int,
                 vocab_size: int, date: str | None = None) -> list[Sample]:
    out = []
    for p in paths:
        out.extend(read_jsonl(p, enc, include_analysis=include_analysis, max_tokens=sequence_length + 1,
                              vocab_size=vocab_size, date=date))
    return out


# ------------------------------------------------------------------------------------------- packing
FIELDS = ("tokens", "targets", "mask", "positions", "segment_ids")


def pack(samples: list[Sample], sequence_length: int, packing: bool = True) -> dict[str, np.ndarray]:
    """Samples (in order) -> rows: each field [R, sequence_length]. Greedy: a sample goes into the
    current row if it fits, else starts the next row (one sample per row without ``packing``)."""
    rows: list[list[Sample]] = []
    fill = sequence_length
    for s in samples:
        n = len(s.tokens) - 1
        if n > sequence_length:
            raise DataError(f"{s.where}: sample is {n + 1} tokens, longer than data.sequence_length + 1")
        if not packing or fill + n > sequence_length:
            rows.append([])
            fill = 0
        rows[-1].append(s)
        fill += n
    out = {
        "tokens": np.zeros((len(rows), sequence_length), np.int32),
        "targets": np.zeros((len(rows), sequence_length), np.int32),
        "mask": np.zeros((len(rows), sequence_length), bool),
        "positions": np.full((len(rows), sequence_length), -1, np.int32),
        "segment_ids": np.zeros((len(rows), sequence_length), np.int32),
    }
    for r, row in enumerate(rows):
        at = 0
        for seg, s in enumerate(row, 1):
            n = len(s.tokens) - 1
            sl = slice(at, at + n)
            out["tokens"][r, sl] = s.tokens[:-1]
            out["targets"][r, sl] = s.tokens[1:]
            out["mask"][r, sl] = s.mask[1:]
            out["positions"][r, sl] = np.arange(n)
            out["segment_ids"][r, sl] = seg
            at += n
    return out


@dataclasses.dataclass
class Position:
    """Where the stream stands: the next row of epoch ``epoch``."""

    epoch: int = 0
    row: int = 0


class Stream:
    """Endless, deterministic stream of packed rows: epoch e packs the samples in the order of
    ``permutation(seed, e)`` (or file order without shuffling). ``position`` is all that resuming needs."""

    def __init__(self, samples: list[Sample], sequence_length: int, *, packing: bool, shuffle: bool, seed: int,
                 position: Position | None = None):
        self.samples, self.sequence_length, self.packing = samples, sequence_length, packing
        self.shuffle, self.seed = shuffle, seed
        self.position = position or Position()
        self._epoch_rows: tuple[int, dict[str, np.ndarray]] | None = None

    def rows_of_epoch(self, epoch: int) -> dict[str, np.ndarray]:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)) if self.shuffle \
                else np.arange(len(self.samples))
            self._epoch_rows = (epoch, pack([self.samples[i] for i in order], self.sequence_length, self.packing))
        return self._epoch_rows[1]

    def take(self, n: int) -> dict[str, np.ndarray]:
        """The next ``n`` rows (crossing into the next epoch when needed): each field [n, T]."""
        parts = []
        while n:
            rows = self.rows_of_epoch(self.position.epoch)
            total = len(rows["tokens"])
            k = min(n, total - self.position.row)
            parts.append({f: rows[f][self.position.row:self.position.row + k] for f in FIELDS})
            n -= k
            self.position.row += k
            if self.position.row == total:
                self.position = Position(self.position.epoch + 1, 0)
        return {f: np.concatenate([p[f] for p in parts]) for f in FIELDS}


def batches(rows: dict[str, np.ndarray], batch_size: int):
    """Fixed rows (evaluation) in batches of ``batch_size``, the last one padded with empty rows."""
    total = len(rows["tokens"])
    for start in range(0, total, batch_size):
        part = {f: rows[f][start:start + batch_size] for f in FIELDS}
        short = batch_size - len(part["tokens"])
        if short:
            part = {f: np.concatenate([a, np.full((short, a.shape[1]), -1 if f == "positions" else 0, a.dtype)])
                    for f, a in part.items()}
        yield part
