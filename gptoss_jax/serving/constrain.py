"""Constrained decoding for chat requests: ``tool_choice`` "required" or a named function, and
``response_format`` json_schema / json_object, as llguidance grammars over the o200k_harmony vocabulary.

The assistant's turn starts after ``<|start|>assistant`` (the prompt's end). Grammars (Lark, with
harmony's special tokens as tokens and llguidance's ``%json`` for schemas):

- a tool call: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>``,
  NAME one of the allowed functions, ARGS JSON matching that function's ``parameters`` schema;
- json_schema / json_object: the final channel's message, ``<|channel|>final<|message|>JSON<|return|>``
  (as vLLM and SGLang do for gpt-oss: structured output applies to the content after the reasoning).

Either may be preceded by one analysis message (``<|channel|>analysis<|message|>...<|end|><|start|>assistant``)
of at most half the request's ``max_tokens``, so the model still reasons and the constrained part always
fits. JSON is compact (no free whitespace), so a model cannot stall in padding. :class:`Constraint` is
the engine's per-request mask (:meth:`gptoss_jax.decode.Engine.submit`).
"""
from __future__ import annotations

import functools
import json
import threading

import numpy as np

from gptoss_jax.serving.api import ApiError

#: JSON compiled without free whitespace (llguidance's default lets a model emit spaces forever)
JSON_OPTIONS = {"whitespace_flexible": False}


def _json_rule(schema) -> str:
    schema = dict(schema) if isinstance(schema, dict) else {}
    schema["x-guidance"] = {**schema.get("x-guidance", {}), **JSON_OPTIONS}
    return f"%json {json.dumps(schema)}"


def _analysis(budget: int) -> str:
    if budget < 1:
        return "start: body\n"
    return ('start: analysis? body\n'
            'analysis: <|channel|> "analysis" <|message|> reasoning <|end|> <|start|> "assistant"\n'
            f'reasoning[max_tokens={budget}]: /(.|\\n)*/\n')


def tool_grammar(tools: list[dict], names: list[str], max_tokens: int) -> str:
    """A Lark grammar: an optional analysis message, then a call of one of ``names`` (from ``tools``)."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
               for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    lines = [_analysis(max_tokens // 2), "body: " + " | ".join(f"call{i}" for i in range(len(names)))]
    for i, name in enumerate(names):
        lines.append(f'call{i}: <|channel|> {json.dumps(f"commentary to=functions.{name} ")} <|constrain|> "json" '
                     f"<|message|> args{i} <|call|>")
        lines.append(f"args{i}: {_json_rule(schemas[name])}")
    return "\n".join(lines) + "\n"


def json_grammar(schema, max_tokens: int) -> str:
    """A Lark grammar: an optional analysis message, then a final message that is JSON matching ``schema``."""
    return _analysis(max_tokens // 2) + f"body: <|channel|> \"final\" <|message|> answer <|return|>\nanswer: {_json_rule(schema)}\n"


def request_grammar(body, max_tokens: int) -> str | None:
    """The grammar a chat request asks for (None: unconstrained); ApiError 400 for an impossible one."""
    choice, fmt = body.tool_choice, getattr(body, "response_format", None)
    tools = [t for t in body.tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    names = [t["function"].get("name") for t in tools]
    if choice == "required" or isinstance(choice, dict):
        if not tools:
            raise ApiError(400, "tool_choice requires 'tools' with at least one function", param="tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise ApiError(400, f"tool_choice names function {name!r}, which is not in 'tools' "
                                    f"({', '.join(map(str, names))})", param="tool_choice")
            names = [name]
        return tool_grammar(tools, names, max_tokens)
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format.json_schema must be an object with a 'schema' object",
                           param="response_format")
        return json_grammar(spec.get("schema") or {}, max_tokens)
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return json_grammar({"type": "object"}, max_tokens)
    return None


class Grammars:
    """The llguidance tokenizer of the o200k_harmony vocabulary (built once, ~5 s) and per-request matchers."""

    def __init__(self, vocab: str | None, vocab_size: int):
        self.vocab, self.vocab_size = vocab, vocab_size
        self._lock = threading.Lock()
        self._tokenizer = None

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from llguidance.tiktoken import lltokenizer_from_encoding

                from gptoss_jax.tokenizer import load_tokenizer

                self._tokenizer = lltokenizer_from_encoding(load_tokenizer(self.vocab), n_vocab=self.vocab_size,
                                                            eos_token=200002)
            return self._tokenizer

    def constraint(self, grammar: str) -> "Constraint":
        """A fresh :class:`Constraint` for ``grammar``; ApiError 400 when llguidance cannot compile it."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ApiError(400, f"cannot constrain decoding to this schema: {matcher.get_error()}",
                           param="response_format")
        return Constraint(matcher)


class Constraint:
    """One request's grammar state: ``fill(row)`` writes the packed int32 mask of the tokens allowed next
    (bit ``v % 32`` of word ``v // 32``), ``advance(token)`` consumes the sampled token."""

    def __init__(self, matcher):
        self.matcher = matcher

    def fill(self, row: np.ndarray) -> None:
        import llguidance.numpy as lnp

        lnp.fill_next_token_bitmask(self.matcher, row[None], 0)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(int(token)))


@functools.cache
def grammars(vocab: str | None, vocab_size: int) -> Grammars:
    return Grammars(vocab, vocab_size)


def request_constraint(body, params, fmt, engine) -> Constraint | None:
    """The engine constraint of one choice of a chat request (None: unconstrained)."""
    grammar = request_grammar(body, params.max_tokens)
    if grammar is None:
        return None
    vocab_size = getattr(getattr(engine, "config", None), "vocab_size", 201088)
    return grammars(fmt.vocab, vocab_size).constraint(grammar)

