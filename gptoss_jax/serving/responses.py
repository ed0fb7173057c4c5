"""The Responses API, gpt-oss's native interface: ``POST /v1/responses`` (streaming or not),
``GET``/``DELETE /v1/responses/{id}``.

Input items map onto the chat messages :meth:`ChatFormat.render` already renders (one renderer):
``instructions`` and system/developer messages -> the developer message; ``message`` items -> chat
messages; consecutive ``reasoning``, assistant ``message`` and ``function_call`` items -> one assistant
message (``reasoning_content``, ``content``, ``tool_calls``); ``function_call_output`` -> a tool message.
Parsing, validation and rendering run in the render workers (:meth:`prepare`), as for chat.

Output: the harmony parser's deltas, in order, become output items (:class:`Items`): a ``reasoning``
item (the analysis channel as ``reasoning_text`` content), a ``message`` item (``output_text``) and
``function_call`` items; streamed as the documented events with ``sequence_number``.

``previous_response_id``: finished responses (``store``, default true) are kept in memory, the
``--responses-store`` most recent (:class:`ResponseStore`, LRU), with their conversation (input and
output as chat messages, without ``instructions``, which do not carry over, as in OpenAI's API). The
follow-up's worker renders that conversation followed by the new input.
"""
from __future__ import annotations

import collections
import json
import logging
import time
import types
import uuid
from typing import Any, ClassVar, Literal

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from gptoss_jax.harmony import ChatFormatError
from gptoss_jax.serving import constrain
from gptoss_jax.serving.api import MAX_INT32, MAX_SEED, ApiError, Refusing
from gptoss_jax.serving.choice import Choice
from gptoss_jax.serving.validate import check_unicode, least_tokens, parse

log = logging.getLogger(__name__)

#: responses kept for ``previous_response_id`` and ``GET /v1/responses/{id}`` (``--responses-store``)
DEFAULT_STORE = 256
#: OpenAI's metadata bounds: 16 pairs, keys up to 64 characters, values up to 512
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
#: ``include`` values we can give (the others, e.g. ``reasoning.encrypted_content``, are refused)
INCLUDABLE = ()


class Reasoning(BaseModel):
    effort: Literal["low", "medium", "high"] | None = None
    summary: str | None = None  # accepted; gpt-oss gives its raw reasoning (content), not a summary


class ResponsesRequest(Refusing):
    """A ``POST /v1/responses`` body (see :class:`Refusing` for fields outside the schema)."""

    NEUTRAL: ClassVar[dict] = {
        "background": lambda v: not v, "include": lambda v: not v or all(x in INCLUDABLE for x in v),
        "conversation": lambda v: v is None, "prompt": lambda v: v is None,
        "truncation": lambda v: v in (None, "disabled"), "top_logprobs": lambda v: not v,
        "max_tool_calls": lambda v: v is None}

    model: str
    input: Any = ""  # a string or a list of items (checked below: one error naming ``input``)
    instructions: str | None = None
    reasoning: Reasoning | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # extensions shared with chat (not in OpenAI's Responses API)
    top_k: int | None = Field(None, ge=0, le=MAX_INT32)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    stream: bool = False
    _messages: list = PrivateAttr(default_factory=list)  # the conversation (worker side: history + input)
    _grammar: Any = PrivateAttr(None)  # a chat-shaped view for serving/constrain.py, or None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if not isinstance(v, (str, list)) or (isinstance(v, list) and not all(isinstance(x, dict) for x in v)):
            raise ValueError("expected a string or a list of items (objects)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > METADATA_PAIRS or any(len(k) > METADATA_KEY or len(x) > METADATA_VALUE
                                                            for k, x in v.items())):
            raise ValueError(f"at most {METADATA_PAIRS} pairs, keys up to {METADATA_KEY} characters, "
                             f"values up to {METADATA_VALUE}")
        return v

    def bias_pairs(self) -> tuple:
        return ()

    def fmt(self) -> dict:
        return (self.text or {}).get("format") or {"type": "text"}


# ------------------------------------------------------------------ input items -> chat messages (worker)
def _content(content, where: str, kinds=("input_text", "output_text", "text")) -> str:
    """A message item's content (a string or text parts) -> str; other parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content: expected a string or a list of content parts", param=f"{where}.content")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.content[{i}]: only text parts ({', '.join(kinds)}) are supported, got "
                                f"{json.dumps(kind)}", param=f"{where}.content[{i}]", code="unsupported_parameter")
        parts.append(part["text"])
    return "".join(parts)


def _string(item: dict, key: str, where: str) -> str:
    if not isinstance(item.get(key), str):
        raise ApiError(400, f"{where}.{key}: expected a string", param=f"{where}.{key}")
    return item[key]


def items_to_messages(items: list, where: str = "input") -> list[dict]:
    """Responses input items -> chat messages; consecutive assistant items merge into one message."""
    out: list[dict] = []

    def assistant(start_if: tuple) -> dict:
        last = out[-1] if out else None
        if last is None or last["role"] != "assistant" or any(last.get(k) for k in start_if):
            out.append(last := {"role": "assistant", "content": "", "tool_calls": []})
        return last

    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") == "assistant":
            assistant(("content", "tool_calls"))["content"] = _content(item.get("content"), at)
        elif kind == "message" and item.get("role") in ("user", "system", "developer"):
            out.append({"role": item["role"], "content": _content(item.get("content"), at)})
        elif kind == "message":
            raise ApiError(400, f"{at}.role: expected user, assistant, system or developer, got "
                                f"{json.dumps(item.get('role'))}", param=f"{at}.role")
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = _content(parts, at, kinds=("reasoning_text", "summary_text"))
            assistant(("reasoning_content", "content", "tool_calls"))["reasoning_content"] = text
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", at), "type": "function",
                    "function": {"name": _string(item, "name", at), "arguments": _string(item, "arguments", at)}}
            assistant(())["tool_calls"].append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content(output, at, kinds=("input_text", "output_text"))
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", at), "content": text})
        else:
            raise ApiError(400, f"{at}.type: {json.dumps(kind)} items are not supported (message, reasoning, "
                                "function_call, function_call_output are)", param=f"{at}.type",
                           code="unsupported_parameter")
    return out


def chat_tools(body: ResponsesRequest) -> list[dict]:
    """Responses function tools ``{type, name, description, parameters}`` -> chat tools; others refused."""
    tools = []
    for i, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise ApiError(400, f"tools[{i}].type: only function tools are supported, got "
                                f"{json.dumps(tool.get('type'))}", param=f"tools[{i}].type",
                           code="unsupported_parameter")
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ApiError(400, f"tools[{i}].name: expected a non-empty string", param=f"tools[{i}].name")
        tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                        if tool.get(k) is not None}})
    return tools


def grammar_view(body: ResponsesRequest, tools: list[dict]):
    """What :func:`constrain.request_grammar` reads of a chat request (tool_choice, tools,
    response_format), from a Responses request; None when decoding is unconstrained."""
    choice, fmt = body.tool_choice, body.fmt()
    if not isinstance(fmt, dict):
        raise ApiError(400, "text.format: expected an object", param="text.format")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise ApiError(400, "tool_choice: only 'none', 'auto', 'required' or a function "
                                "({'type': 'function', 'name': ...}) are supported", param="tool_choice",
                           code="unsupported_parameter")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"text.format: unsupported type {json.dumps(fmt.get('type'))}", param="text.format",
                       code="unsupported_parameter")
    response_format = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema") or {}}} \
        if fmt["type"] == "json_schema" else {"type": fmt["type"]}
    if choice != "required" and not isinstance(choice, dict) and fmt["type"] == "text":
        return None  # unconstrained
    return types.SimpleNamespace(tool_choice=choice, tools=tools, response_format=response_format)


def prepare(preparer, raw: bytes, history: list | None = None):
    """Worker side: the validated request (its conversation in ``_messages``) and its prompt ids; the
    prompt is None when the request continues a stored response whose ``history`` was not given."""
    obj, body = parse(raw, ResponsesRequest)
    check_unicode(obj)
    if body.previous_response_id is not None and history is None:
        return body, None
    new = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else items_to_messages(body.input)
    tools, conversation = chat_tools(body), (history or []) + new
    grammar = grammar_view(body, tools)
    messages = ([{"role": "developer", "content": body.instructions}] if body.instructions else []) + conversation
    if not messages:
        raise ApiError(400, "input: expected a non-empty input (or a previous_response_id)", param="input")
    if (least := least_tokens(types.SimpleNamespace(messages=messages))) >= preparer.context:
        raise ApiError(400, f"This model's maximum context length is {preparer.context} tokens, but the input "
                            f"takes at least {least} tokens", param="input", code="context_length_exceeded")
    effort = (body.reasoning and body.reasoning.effort) or preparer.reasoning_effort
    try:
        prompt = preparer.fmt.render(messages, tools=None if body.tool_choice == "none" else tools,
                                     reasoning_effort=effort)
    except ChatFormatError as e:
        param = "tools" if str(e).startswith("tools") else "input"
        raise ApiError(400, f"{param}: {e}", param=param) from None
    body = body.model_copy(update={"input": ""})  # sent back to the server: the conversation is enough
    body._messages, body._grammar = conversation, grammar
    return body, prompt


# ------------------------------------------------------------------ output items and stream events
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


#: the output item a Delta kind writes to
ITEM_OF = {"reasoning": "reasoning", "content": "message", "tool_call": "function_call", "arguments": "function_call"}
#: the stream event of text added to an item, and of the item's whole text
DELTA_EVENT = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta",
               "function_call": "response.function_call_arguments.delta"}
DONE_EVENT = {"reasoning": "response.reasoning_text.done", "message": "response.output_text.done"}


class Items:
    """A choice's output items, built from its deltas in order; :meth:`feed` and :meth:`close` return the
    stream events they make (without ``sequence_number``)."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.text = ""  # its text (reasoning, message text or call arguments)

    def feed(self, d) -> list[dict]:
        kind = ITEM_OF[d.kind]
        events = []
        if d.kind == "tool_call" or self.open is None or self.open["type"] != kind:
            events = self.close() + self._add(kind, d.call)
        if d.text:
            self.text += d.text
            logprobs = {"logprobs": []} if kind == "message" else {}
            events.append(self._event(DELTA_EVENT[kind], delta=d.text, **logprobs))
        return events

    def _event(self, kind: str, **fields) -> dict:
        part = {} if self.open["type"] == "function_call" else {"content_index": 0}
        return {"type": kind, "item_id": self.open["id"], "output_index": len(self.items) - 1, **part, **fields}

    def _part(self) -> dict:
        if self.open["type"] == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}

    def _add(self, kind: str, call) -> list[dict]:
        if kind == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        elif kind == "message":
            item = {"id": _id("msg"), "type": "message", "role": "assistant", "content": [], "status": "in_progress"}
        else:
            item = {"id": _id("fc"), "type": "function_call", "call_id": call.id, "name": call.name, "arguments": "",
                    "status": "in_progress"}
        self.open, self.text = item, ""
        self.items.append(item)
        events = [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(item)}]
        if kind != "function_call":
            events.append(self._event("response.content_part.added", part=self._part()))
        return events

    def close(self, status: str = "completed") -> list[dict]:
        """End the open item (``status``: its final status); its done events."""
        item, text = self.open, self.text
        if item is None:
            return []
        if item["type"] == "function_call":
            item["arguments"] = text
            events = [self._event("response.function_call_arguments.done", arguments=text)]
        else:
            item["content"] = [self._part()]
            logprobs = {"logprobs": []} if item["type"] == "message" else {}
            events = [self._event(DONE_EVENT[item["type"]], text=text, **logprobs),
                      self._event("response.content_part.done", part=self._part())]
        item["status"] = status
        events.append({"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": dict(item)})
        self.open, self.text = None, ""
        return events


class ResponseStore:
    """Finished responses and their conversations (chat messages), the ``size`` most recently used."""

    def __init__(self, size: int):
        self.size = size
        self.entries: collections.OrderedDict[str, tuple[dict, list]] = collections.OrderedDict()

    def put(self, response: dict, messages: list) -> None:
        if self.size <= 0:
            return
        self.entries[response["id"]] = (response, messages)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, list]:
        """(response, messages); ApiError naming ``param`` (400) or 404 (no param) when not stored."""
        if response_id not in self.entries:
            if param:
                raise ApiError(400, f"Previous response with id '{response_id}' not found.", param=param,
                               code="previous_response_not_found")
            raise ApiError(404, f"No response found with id '{response_id}'.", code="response_not_found")
        self.entries.move_to_end(response_id)
        return self.entries[response_id]

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self.entries[response_id]


def response_head(server, body: ResponsesRequest, effort: str) -> dict:
    """The response object before any output (``status: in_progress``; ``effort``: the server's default)."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return {"id": _id("resp"), "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "model": server.model_name, "output": [],
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": (body.reasoning and body.reasoning.effort) or effort, "summary": None},
            "store": body.store, "temperature": pick(body.temperature, server.default_params.temperature),
            "text": {"format": body.fmt()}, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
            "top_p": pick(body.top_p, server.default_params.top_p), "truncation": "disabled", "usage": None,
            "metadata": body.metadata or {}}


async def response_events(store: ResponseStore, body: ResponsesRequest, prompt: list[int], choice, head: dict):
    """The events of one response, from ``response.created`` to ``response.completed`` (or
    ``response.incomplete``: max_output_tokens reached); the finished response is stored."""
    yield {"type": "response.created", "response": head}
    yield {"type": "response.in_progress", "response": head}
    items = Items()
    async for d in choice.deltas():
        for event in items.feed(d):
            yield event
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    for event in items.close(status):
        yield event
    n = choice.tokens
    response = {**head, "status": status, "output": items.items,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "usage": {"input_tokens": len(prompt), "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": n, "output_tokens_details": {"reasoning_tokens": choice.reasoning_tokens},
                          "total_tokens": len(prompt) + n}}
    if body.store:
        store.put(response, body._messages + items_to_messages(items.items, "output"))
    yield {"type": f"response.{status}", "response": response}


async def numbered(events):
    """``sequence_number`` on every event; an error ends the stream as an ``error`` event."""
    n = 0
    try:
        async for event in events:
            yield {**event, "sequence_number": n}
            n += 1
    except ApiError as e:
        yield {"type": "error", "code": e.code or e.type, "message": e.message, "param": e.param, "sequence_number": n}
    except Exception as e:  # noqa: BLE001 - the response has started: the error goes in the stream
        log.exception("stream failed")
        yield {"type": "error", "code": "server_error", "message": f"internal error: {type(e).__name__}",
               "param": None, "sequence_number": n}


def sse_event(event: dict) -> str:
    """One server-sent event named by its type, as the Responses API streams them (no ``[DONE]``)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------ the routes
def submit(server, body: ResponsesRequest, prompt: list[int]):
    """The engine request of a response, as a tracked :class:`Choice` (in a list, for Server.release)."""
    server.check_length(prompt, "input")
    params = server.sampling(body, 0, body.max_output_tokens)
    constraint = None if body._grammar is None else constrain.request_constraint(body._grammar, params, server.fmt,
                                                                                 server.engine)
    try:
        request = server.engine.submit(prompt, params, **({} if constraint is None else {"constraint": constraint}))
    except ValueError as e:  # the engine refused the prompt
        raise ApiError(400, str(e), param="input") from None
    return [server.track(Choice(0, request, server.fmt, []))]


def add_response_routes(app: FastAPI, server, store: ResponseStore, effort: str = "medium") -> None:
    """``POST /v1/responses`` (streaming or not), ``GET`` and ``DELETE /v1/responses/{id}`` (``effort``: the
    reasoning effort of requests without one)."""
    @app.post("/v1/responses", dependencies=[Depends(server.authorize)])
    async def create(request: Request):
        raw = await request.body()
        body, prompt = await server.prepare(raw, "responses")
        server.find_model(body.model)
        server.refuse_unsupported(body)
        if prompt is None:  # continues a stored response: render its conversation, then the new input
            _, history = store.get(body.previous_response_id, param="previous_response_id")
            body, prompt = await server.prepare(raw, "responses", history)
        choices = submit(server, body, prompt)
        events = response_events(store, body, prompt, choices[0], response_head(server, body, effort))
        if body.stream:
            return server.streaming(numbered(events), choices, frame=sse_event, done="")
        last = {}

        async def drain():
            nonlocal last
            async for event in events:
                last = event
        try:
            await server.wait_for_client(request, drain())
        finally:
            server.release(choices)
        return last["response"]

    @app.get("/v1/responses/{response_id}", dependencies=[Depends(server.authorize)])
    async def retrieve(response_id: str):
        return store.get(response_id)[0]

    @app.delete("/v1/responses/{response_id}", dependencies=[Depends(server.authorize)])
    async def delete(response_id: str):
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}
