"""Untrusted request bodies: JSON parsing into a request schema, Unicode checks and the cheap lower bound
on a chat prompt's length (see :mod:`gptoss_jax.serving.prompts` for the order they run in)."""
from __future__ import annotations

import json
import re

import pydantic

from gptoss_jax.harmony import _text
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
