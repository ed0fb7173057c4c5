"""The harmony chat format, through the official openai-harmony package.

``ChatFormat.render(messages)`` turns OpenAI-style chat messages into prompt ids;
``ChatFormat.parser()`` turns generated ids back into reasoning (analysis channel), content (final
channel, and commentary preambles) and tool calls (messages addressed to ``functions.NAME``),
incrementally for streaming.

OpenAI roles map onto harmony as the gpt-oss docs prescribe: ``system`` and ``developer`` messages
become the developer message's instructions (the harmony system message carries the model identity,
reasoning effort and date); an assistant message's ``reasoning_content`` is its analysis message,
its ``tool_calls`` are commentary messages to ``functions.NAME`` ending in ``<|call|>``; a ``tool``
message is authored by ``functions.NAME`` and addressed to the assistant.
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import functools
import json
import os
import shutil
import tempfile
import uuid

import openai_harmony as oh

from gptoss_jax.tokenizer import (MAX_PIECE_CHARS, VOCAB_FILENAME, TextStream, encode_bounded, find_vocab,
                                  load_tokenizer, long_piece, read_vocab)

REASONING_EFFORTS = ("low", "medium", "high")
#: header tokens after which output that never opened a message is taken for plain text (real headers,
#: e.g. ' to=functions.get_weather<|channel|>commentary <|constrain|>json', take about a dozen)
MAX_HEADER_TOKENS = 32
#: a message text with a pre-tokenizer piece longer than this (characters) is tokenized by
#: :func:`encode_bounded` instead of openai-harmony, whose BPE takes time quadratic in a piece's length
#: (5 s for a run of 100,000 'a') and whose regex overflows its stack on ~1M spaces
HARMONY_MAX_PIECE = 512


class ChatFormatError(ValueError):
    """A chat request that cannot be rendered (names the message and field)."""


@functools.lru_cache(maxsize=4)
def _encoding(path: str | None) -> oh.HarmonyEncoding:
    if path is not None:
        read_vocab(path)  # a clear error for a wrong file before openai-harmony's own hash check
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) != VOCAB_FILENAME:  # openai-harmony wants <folder>/o200k_base.tiktoken
            folder = tempfile.mkdtemp(prefix="gptoss-vocab-")
            os.symlink(os.path.abspath(path), os.path.join(folder, VOCAB_FILENAME))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def load_encoding(vocab: str | os.PathLike | None = None) -> oh.HarmonyEncoding:
    """openai-harmony's gpt-oss encoding, offline from the same vocabulary as :func:`load_tokenizer`.

    A local vocabulary is handed to openai-harmony through ``$TIKTOKEN_ENCODINGS_BASE`` (set in this
    process); without one, openai-harmony downloads it.
    """
    return _encoding(find_vocab(vocab))


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclasses.dataclass
class Output:
    """What the assistant said: reasoning (analysis), content (final/preambles), tool calls."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Delta:
    """One streaming piece. kind: 'reasoning' | 'content' | 'tool_call' (a new call, ``call`` set, text
    empty) | 'arguments' (text appended to call number ``index``)."""
    kind: str
    text: str = ""
    index: int | None = None
    call: ToolCall | None = None


def _text(content, where: str) -> str:
    """OpenAI message content (a string or a list of text parts) -> str."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{where}.content[{i}]: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError(f"{where}.content: expected a string or a list of text parts")


class _Spliced:
    """Message texts that openai-harmony renders as a marker, replaced by :func:`encode_bounded` ids after.

    Only for texts harmony tokenizes on their own (a message's content, between ``<|message|>`` and
    ``<|end|>``/``<|call|>``/``<|return|>``), so the ids are the ones harmony would give.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.nonce = uuid.uuid4().hex
        self.texts: list[tuple[list[int], str]] = []  # (marker ids, text)

    def text(self, text: str) -> str:
        """``text``, or a marker for it when it has a piece too long for openai-harmony."""
        if not long_piece(text, HARMONY_MAX_PIECE):
            return text
        marker = f"\x00{self.nonce}:{len(self.texts)}\x00"
        self.texts.append((self.tokenizer.encode_ordinary(marker), text))
        return marker

    def splice(self, ids: list[int]) -> list[int]:
        """Rendered ``ids`` with each marker's ids replaced by its text's (a dropped message has none)."""
        for marker, text in self.texts:
            at = [i for i in range(len(ids) - len(marker) + 1) if ids[i] == marker[0] and ids[i:i + len(marker)] == marker]
            if len(at) > 1:
                raise RuntimeError(f"a text marker was rendered {len(at)} times")
            if at:
                ids = ids[:at[0]] + encode_bounded(self.tokenizer, text) + ids[at[0] + len(marker):]
        return ids


def _no_long_piece(text: str, where: str) -> str:
    """``text`` if openai-harmony tokenizes it in bounded time inside a larger text, else ChatFormatError."""
    if n := long_piece(text, MAX_PIECE_CHARS):
        raise ChatFormatError(f"{where}: a run of {n} characters without a break (over {MAX_PIECE_CHARS}) is not "
                              "supported here")
    return text


def _tool_descriptions(tools) -> list[oh.ToolDescription]:
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if fn is None or tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise ChatFormatError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}")
        for key, kind in (("name", str), ("description", str), ("parameters", dict)):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise ChatFormatError(f"tools[{i}].function.{key}: expected {'a string' if kind is str else 'an object'}")
        _no_long_piece(json.dumps(fn, ensure_ascii=False), f"tools[{i}]")
        out.append(oh.ToolDescription.new(fn["name"], fn.get("description") or "", parameters=fn.get("parameters")))
    return out


class ChatFormat:
    """Harmony rendering and parsing for gpt-oss (one per process; cheap to share across threads)."""

    def __init__(self, vocab: str | os.PathLike | None = None):
        self.tokenizer = load_tokenizer(vocab)  # first: a tiktoken download lands in its cache, found next
        self.encoding = load_encoding(vocab)
        self.vocab = find_vocab(vocab)  # the local file used (None: tiktoken's download), for worker processes

    def conversation(self, messages: list[dict], *, tools: list[dict] | None = None,
                     reasoning_effort: str = "medium", date: str | datetime.date | None = None,
                     model_identity: str | None = None, _spliced: _Spliced | None = None) -> oh.Conversation:
        """OpenAI-style ``messages`` (+ function ``tools``) -> a harmony Conversation (:func:`conversation`)."""
        own = _spliced.text if _spliced is not None else None
        return conversation(messages, tools=tools, reasoning_effort=reasoning_effort, date=date,
                            model_identity=model_identity, own=own)

    def render(self, messages: list[dict], **options) -> list[int]:
        """Prompt ids for the assistant's next turn (options as :func:`conversation`), as openai-harmony
        renders them; message texts with runs over :data:`HARMONY_MAX_PIECE` characters are tokenized by
        :func:`encode_bounded` (the same ids, in linear time; runs over ``MAX_PIECE_CHARS`` are cut)."""
        spliced = _Spliced(self.tokenizer)
        conversation = self.conversation(messages, **options, _spliced=spliced)
        return spliced.splice(self.encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT))

    def parser(self) -> "OutputParser":
        return OutputParser(self)

    def parse(self, tokens) -> Output:
        """Generated ids -> :class:`Output` (all at once)."""
        parser = self.parser()
        for t in tokens:
            parser.feed(t)
        parser.finish()
        return parser.output


def conversation_date(date: str | datetime.date | None = None) -> str:
    """The system message's ``Current date:``: ``date`` when given, else today (serving and training alike)."""
    return str(date or datetime.date.today())


def conversation(messages: list[dict], *, tools: list[dict] | None = None, reasoning_effort: str = "medium",
                 date: str | datetime.date | None = None, model_identity: str | None = None,
                 own=None) -> oh.Conversation:
    """The one renderer: OpenAI-style ``messages`` (+ function ``tools``) -> a harmony Conversation, for
    serving (:meth:`ChatFormat.render`) and training (``train.data``) alike.

    The system message carries the reasoning effort and :func:`conversation_date`; ``own(text)`` maps
    texts harmony tokenizes alone (serving's long-run splicing; default identity)."""
    own = own or (lambda text: text)
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort: expected one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(reasoning_effort.capitalize()))
    system = system.with_conversation_start_date(conversation_date(date))
    if model_identity:
        system = system.with_model_identity(model_identity)
    instructions, turns, call_names = [], [], {}
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            instructions.append(_no_long_piece(_text(m.get("content"), where), f"{where}.content"))
        elif role == "user":
            turns.append(oh.Message.from_role_and_content(oh.Role.USER, own(_text(m.get("content"), where))))
        elif role == "assistant":
            turns += _assistant(m, where, call_names, own)
        elif role == "tool":
            if not all(isinstance(m.get(k, ""), (str, type(None))) for k in ("name", "tool_call_id")):
                raise ChatFormatError(f"{where}: name and tool_call_id must be strings")
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if not name:
                raise ChatFormatError(f"{where}: tool_call_id {m.get('tool_call_id')!r} matches no earlier tool call")
            author = oh.Author.new(oh.Role.TOOL, f"functions.{_no_long_piece(str(name), where + '.name')}")
            turns.append(oh.Message.from_author_and_content(author, own(_text(m.get("content"), where)))
                         .with_recipient("assistant").with_channel("commentary"))
        else:
            raise ChatFormatError(f"{where}.role: expected system, developer, user, assistant or tool, got {role!r}")
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if instructions or tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools(_tool_descriptions(tools))
        head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    return oh.Conversation.from_messages(head + turns)


def _assistant(m: dict, where: str, call_names: dict, own) -> list[oh.Message]:
    out = []
    reasoning = m.get("reasoning_content") or m.get("reasoning")
    if reasoning:
        if not isinstance(reasoning, str):
            raise ChatFormatError(f"{where}.reasoning_content: expected a string")
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, own(reasoning)).with_channel("analysis"))
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ChatFormatError(f"{where}.tool_calls: expected a list")
    content = _text(m.get("content"), where)
    if content:  # said before tool calls it is a commentary preamble, else the final answer
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, own(content))
                   .with_channel("commentary" if calls else "final"))
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{where}.tool_calls[{j}]: expected {{'function': {{'name', 'arguments'}}}}")
        if not isinstance(call.get("id", ""), (str, type(None))):
            raise ChatFormatError(f"{where}.tool_calls[{j}].id: expected a string")
        call_names[call.get("id")] = _no_long_piece(fn["name"], f"{where}.tool_calls[{j}].function.name")
        if not isinstance(fn.get("arguments") or "", str):
            raise ChatFormatError(f"{where}.tool_calls[{j}].function.arguments: expected a string")
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, own(fn.get("arguments") or "{}"))
                   .with_channel("commentary").with_recipient(f"functions.{fn['name']}")
                   .with_content_type("<|constrain|>json"))
    return out


class OutputParser:
    """Generated ids -> :class:`Delta` pieces, one token at a time; ``output`` accumulates the result.

    Output that breaks the harmony format (e.g. from random weights) is passed on as plain content
    from the point where it breaks, so nothing the model generated is lost.
    """

    def __init__(self, fmt: ChatFormat):
        self._parser = oh.StreamableParser(fmt.encoding, oh.Role.ASSISTANT)
        self._text = TextStream(fmt.tokenizer)
        self._plain = False          # the format broke: everything from here is plain content
        self._pending: list[int] = []  # tokens of the header being read
        self._kind: str | None = None  # route of the message being read ('reasoning'/'content'/'arguments')
        self._messages = 0
        self.output = Output()

    def feed(self, token: int) -> list[Delta]:
        if self._plain:
            return self._emit("content", self._text.push(token))
        try:
            self._parser.process(token)
        except oh.HarmonyError:
            return self._break([*self._pending, token])
        if self._parser.state != oh.StreamState.CONTENT:
            if self._kind is not None:  # the message just ended
                self._kind, self._messages = None, self._messages + 1
                return []
            self._pending.append(token)
            return self._break(self._pending) if len(self._pending) > MAX_HEADER_TOKENS else []
        out = []
        if self._kind is None:  # a message just opened
            self._pending = []
            out += self._open(self._parser.current_channel, self._parser.current_recipient)
        return out + self._emit(self._kind, self._parser.last_content_delta or "")

    def finish(self) -> list[Delta]:
        """End of generation (stop token, length or cancel): close the open message."""
        if self._plain:
            return self._emit("content", self._text.flush())
        try:
            self._parser.process_eos()
        except oh.HarmonyError:  # cut inside a header: plain text only if no message ever parsed
            if self._messages == 0 and self._kind is None:
                return self._break(self._pending) + self._emit("content", self._text.flush())
        return []

    def _open(self, channel: str | None, recipient: str | None) -> list[Delta]:
        if recipient and recipient not in ("assistant", "user"):
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", recipient.removeprefix("functions."))
            self.output.tool_calls.append(call)
            self._kind = "arguments"
            return [Delta("tool_call", index=len(self.output.tool_calls) - 1, call=dataclasses.replace(call))]
        self._kind = "reasoning" if channel == "analysis" else "content"
        return []

    def _break(self, tokens: list[int]) -> list[Delta]:
        self._plain, self._pending = True, []
        return self._emit("content", "".join(self._text.push(t) for t in tokens))

    def _emit(self, kind: str, text: str) -> list[Delta]:
        if not text:
            return []
        if kind == "arguments":
            self.output.tool_calls[-1].arguments += text
            return [Delta(kind, text, index=len(self.output.tool_calls) - 1)]
        setattr(self.output, kind, getattr(self.output, kind) + text)
        return [Delta(kind, text)]
