"""A chat-completions request body (untrusted bytes) -> the validated request and its prompt ids.

Runs in the server's render workers (:mod:`gptoss_jax.serving.workers`): parsing, validation, the
cheap bounds below and harmony rendering never run on the event loop. In order:

1. JSON (``NaN``/``Infinity`` refused), then the schema (:class:`ChatCompletionRequest`);
2. every string in the body must be valid Unicode (a lone surrogate such as ``"\\ud83d"`` is named by
   its field, e.g. ``messages[0].content``);
3. a lower bound on the prompt's length, before tokenizing: no o200k token is longer than 128 bytes,
   so a text of ``b`` UTF-8 bytes is at least ``b // 128`` tokens, and each user or tool message adds at
   least 4 (``<|start|>``, role, ``<|message|>``, ``<|end|>``). Reasoning of earlier turns, which
   harmony may drop, is not counted. A bound at the context or above is ``context_length_exceeded``;
4. :meth:`ChatFormat.render` (long runs of characters tokenized in linear time).
"""
from __future__ import annotations

import json
import re

import pydantic

from gptoss_jax.harmony import ChatFormat, ChatFormatError, _text
from gptoss_jax.serving.api import ApiError, ChatCompletionRequest, validation_error

MAX_TOKEN_BYTES = 128  # the longest o200k_base token (tests check it)
MESSAGE_TOKENS = 4     # <|start|>role<|message|>...<|end|>


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse(raw: bytes, schema=ChatCompletionRequest):
    """The body's JSON and the ``schema`` request it validates to; ApiError 400 otherwise."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN, nesting
        raise ApiError(400, f"The body is not valid JSON: {e}") from None
    try:
        return obj, schema.model_validate(obj)
    except pydantic.ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def bad_unicode(value, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string in ``value`` that is not valid Unicode."""
    try:  # fast (C) check of everything at once; the walk below only finds the culprit
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p or "body"
        elif isinstance(v, dict):
            stack += [(x, f"{p}.{k}" if p else str(k)) for k, x in reversed(list(v.items()))]
            stack += [(k, p or "body") for k in v]
        elif isinstance(v, list):
            stack += [(x, f"{p}[{i}]") for i, x in reversed(list(enumerate(v)))]
    return None


def least_tokens(body: ChatCompletionRequest) -> int:
    """A lower bound on the length of ``body``'s prompt (see the module docstring)."""
    n = 2  # <|start|>assistant
    for i, m in enumerate(body.messages):
        role, where = m.get("role"), f"messages[{i}]"
        texts = [_text(m.get("content"), where)]
        if role in ("user", "tool"):
            n += MESSAGE_TOKENS
        if role == "assistant":
            calls = m.get("tool_calls") if isinstance(m.get("tool_calls"), list) else []
            texts += [c["function"].get("arguments") or "" for c in calls
                      if isinstance(c, dict) and isinstance(c.get("function"), dict)]
        n += sum(len(t.encode("utf-8")) // MAX_TOKEN_BYTES for t in texts if isinstance(t, str))
    return n


def _field(message: str) -> str | None:
    """The field a ChatFormatError names first ('messages[0].role: expected ...' -> 'messages[0].role')."""
    m = re.match(r"[\w\[\].]+(?=:)", message)
    return m.group() if m else None


def check_unicode(obj) -> None:
    if where := bad_unicode(obj):
        raise ApiError(400, f"{where}: invalid Unicode (a lone surrogate; text must be valid UTF-16 in JSON)",
                       param=where)


class Preparer:
    """The worker's handler: ``preparer((kind, raw, *extra))`` -> ``("ok", request, prompt ids)`` or
    ``("error", status, error body)``; ``kind`` names the endpoint's method in :attr:`KINDS`, which
    takes ``raw`` and ``extra``."""

    KINDS = {"chat": "prepare_chat", "responses": "prepare_responses"}

    def __init__(self, vocab: str | None, context: int, reasoning_effort: str):
        self.fmt, self.context, self.reasoning_effort = ChatFormat(vocab), context, reasoning_effort

    def __call__(self, payload: tuple):
        kind, raw, *extra = payload
        try:
            return ("ok", *getattr(self, self.KINDS[kind])(raw, *extra))
        except ApiError as e:
            return "error", e.status, e.body()

    def prepare_chat(self, raw: bytes) -> tuple[ChatCompletionRequest, list[int]]:
        """A chat completion: the request without messages/tools and its rendered prompt."""
        obj, body = parse(raw)
        check_unicode(obj)
        try:
            if (least := least_tokens(body)) >= self.context:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the "
                                    f"messages take at least {least} tokens", param="messages",
                               code="context_length_exceeded")
            prompt = self.fmt.render(body.messages, tools=None if body.tool_choice == "none" else body.tools,
                                     reasoning_effort=body.reasoning_effort or self.reasoning_effort)
        except ChatFormatError as e:
            raise ApiError(400, str(e), param=_field(str(e))) from None
        constrained = body.tool_choice == "required" or isinstance(body.tool_choice, dict)
        return body.model_copy(update={"messages": [], "tools": body.tools if constrained else None}), prompt

    def prepare_responses(self, raw: bytes, history: list | None = None):
        """A Responses request (:func:`gptoss_jax.serving.responses.prepare`; ``history``: the conversation
        of its ``previous_response_id``)."""
        from gptoss_jax.serving.responses import prepare

        return prepare(self, raw, history)
