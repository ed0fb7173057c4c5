"""OpenAI-compatible HTTP server over the batched decoding engine.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``
(streaming SSE or not). Reasoning (the analysis channel) is returned as ``reasoning_content`` apart from
``content``; function ``tools`` come back as ``tool_calls`` with finish_reason ``"tool_calls"``.
All concurrent requests are submitted to one engine, which decodes them in one batch. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from gptoss_jax.harmony import ChatFormat, ChatFormatError, Delta

log = logging.getLogger(__name__)

#: how often a non-streaming request checks whether its client is still there (seconds)
DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields we act on; other OpenAI fields are accepted and ignored, except those in
    :data:`NEUTRAL_VALUES`, which would change the answer: set to anything but a neutral value they are
    refused rather than ignored."""
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    def unsupported(self) -> tuple[str, Any] | None:
        """(field, value) of the first field set to a value this server cannot honour, or None."""
        extra = self.model_extra or {}
        return next(((name, extra[name]) for name, honoured in NEUTRAL_VALUES.items()
                     if name in extra and not honoured(extra[name])), None)


#: OpenAI fields that would change the answer, each with a test of the (neutral) values this server honours.
NEUTRAL_VALUES = {
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


class StopStrings:
    """Cuts content at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        text, self.held = self.held + text, ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text, self.held = (text[:-keep], text[-keep:]) if keep else (text, "")
        return text

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.hit else held


class Choice:
    """One generated answer: the engine request, its harmony parser (reasoning, tool calls) and the
    content sent so far (cut at a stop string)."""

    def __init__(self, index: int, request, fmt: ChatFormat, stops: list[str]):
        self.index, self.request = index, request
        self.parser = fmt.parser()
        self.stops = StopStrings(stops)
        self.tokens = 0
        self.content = ""
        self.finish_reason: str | None = None

    async def deltas(self):
        """Async iterator of Deltas (stop strings applied to the content); sets ``finish_reason``."""
        async for token in self.request.aiter():
            self.tokens += 1
            for d in self.parser.feed(token):
                if d := self._cut(d):
                    yield d
            if self.stops.hit:
                self.request.cancel()
                break
        for d in self.parser.finish():
            if d := self._cut(d):
                yield d
        if rest := self.stops.flush():
            self.content += rest
            yield Delta("content", rest)
        reason = "stop" if self.stops.hit else self.request.finish_reason
        if reason == "error":
            raise ApiError(500, "generation failed (see the server log)", type_="server_error")
        self.finish_reason = "tool_calls" if reason == "stop" and self.parser.output.tool_calls else reason

    def _cut(self, d: Delta) -> Delta | None:
        if d.kind != "content":
            return d
        text = self.stops.push(d.text)
        self.content += text
        return Delta("content", text) if text else None

    def message(self) -> dict:
        out = self.parser.output
        msg = {"role": "assistant", "content": self.content or (None if out.tool_calls else ""),
               "reasoning_content": out.reasoning or None}
        if out.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in out.tool_calls]
        return msg


def delta_json(d: Delta) -> dict:
    """A Delta as the ``delta`` of an OpenAI chat.completion.chunk."""
    if d.kind == "reasoning":
        return {"reasoning_content": d.text}
    if d.kind == "content":
        return {"content": d.text}
    if d.kind == "tool_call":
        return {"tool_calls": [{"index": d.index, "id": d.call.id, "type": "function",
                                "function": {"name": d.call.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merge(iterators):
    """Interleave async iterators of (index, item) as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def create_app(engine, fmt: ChatFormat, model_name: str, *, context: int, default_params,
               api_key: str | None = None, reasoning_effort: str = "medium") -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``.

    context: tokens per sequence (prompt + generated) of the engine; default_params: the
    SamplingParams whose fields a request overrides; api_key: when set, requests to /v1 need
    ``Authorization: Bearer <api_key>``.
    """
    app = FastAPI(title="gptoss-jax", version="0.1.0")
    live: set = set()  # engine requests the server is waiting on
    counters = {"requests": 0, "completed": 0, "cancelled": 0}
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errors = e.errors() or [{"msg": "invalid request body"}]
        if errors[0].get("type") == "json_invalid":
            return ApiError(400, f"The body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}").response()
        where = [".".join(str(x) for x in err.get("loc", ()) if x != "body") for err in errors]
        msg = "; ".join(f"{w or 'body'}: {err.get('msg')}" for w, err in zip(where, errors))
        return ApiError(400, msg, param=where[0] or None).response()

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}", type_="server_error").response()

    async def authorize(authorization: str | None = Header(None)):
        if api_key is None:
            return
        if not authorization:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(authorization.removeprefix("Bearer ").strip(), api_key):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gptoss-jax"}

    def find_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"The model '{name}' does not exist (this server has '{model_name}')",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "context": context, "requests_in_flight": len(live),
                **counters, "engine": engine_status(engine)}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str):
        find_model(name)
        return model_card()

    def sampling(body: ChatCompletionRequest, index: int):
        fields = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "seed") if getattr(body, k) is not None}
        if body.seed is not None:
            fields["seed"] = body.seed + index  # n > 1: distinct but reproducible
        fields["max_tokens"] = body.max_completion_tokens or body.max_tokens or default_params.max_tokens
        try:  # the engine stops at the end of the context whatever max_tokens says
            return dataclasses.replace(default_params, **fields)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def submit(body: ChatCompletionRequest, prompt: list[int]) -> list[Choice]:
        if len(prompt) >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens, but the messages "
                                f"take {len(prompt)} tokens", param="messages", code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = [sampling(body, i) for i in range(body.n)]
        choices = []
        try:
            for i, p in enumerate(params):
                choices.append(Choice(i, engine.submit(prompt, p), fmt, stops))
                live.add(choices[-1].request)
                counters["requests"] += 1
        except ValueError as e:  # the engine refused the prompt
            release(choices)
            raise ApiError(400, str(e), param="messages") from None
        return choices

    def release(choices: list[Choice]) -> None:
        for c in choices:
            if c.request in live:
                live.discard(c.request)
                if c.finish_reason is None:
                    c.request.cancel()
                    counters["cancelled"] += 1
                else:
                    counters["completed"] += 1

    def usage(prompt: list[int], choices: list[Choice]) -> dict:
        n = sum(c.tokens for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        find_model(body.model)
        if refused := body.unsupported():
            name, value = refused
            raise ApiError(400, f"'{name}' is not supported by this server (got {json.dumps(value)})",
                           param=name, code="unsupported_parameter")
        try:
            prompt = fmt.render(body.messages, tools=None if body.tool_choice == "none" else body.tools,
                                reasoning_effort=body.reasoning_effort or reasoning_effort)
        except ChatFormatError as e:
            raise ApiError(400, str(e), param=re.match(r"\w*", str(e)).group() or None) from None
        choices = submit(body, prompt)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return CancellingStream(stream(head, prompt, choices, include_usage), lambda: release(choices),
                                    media_type="text/event-stream")
        try:
            await collect(request, choices)
        finally:
            release(choices)
        return {**head, "object": "chat.completion",
                "choices": [{"index": c.index, "message": c.message(), "logprobs": None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": usage(prompt, choices)}

    async def collect(request: Request, choices: list[Choice]) -> None:
        async def drain(c: Choice):
            async for _ in c.deltas():
                pass

        work = asyncio.gather(*(drain(c) for c in choices))
        while True:  # a client that went away frees its slots
            done, _ = await asyncio.wait([work], timeout=DISCONNECT_POLL_S)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise ApiError(499, "client disconnected")

    async def stream(head: dict, prompt: list[int], choices: list[Choice], include_usage: bool):
        def chunk(index: int, delta: dict, finish_reason=None) -> str:
            return _sse({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        def one(c: Choice):
            async def it():
                yield {"role": "assistant", "content": ""}
                async for d in c.deltas():
                    yield delta_json(d)
            return it()

        try:
            async for i, delta in _merge([one(c) for c in choices]):
                yield chunk(i, delta)
            for c in choices:
                yield chunk(c.index, {}, c.finish_reason)
            if include_usage:
                yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(prompt, choices)})
        except ApiError as e:
            yield _sse(e.body())
        finally:
            release(choices)
        yield "data: [DONE]\n\n"

    return app


def engine_status(engine) -> dict:
    """Slots in use, requests waiting and the engine's counters (for /health)."""
    slots = getattr(engine, "_slots", [])
    return {"max_batch": getattr(engine, "max_batch", None), "active": sum(s is not None for s in slots),
            "waiting": len(getattr(engine, "_waiting", ())), **dict(getattr(engine, "stats", {}))}


class CancellingStream(StreamingResponse):
    """A StreamingResponse that runs ``on_close`` however the response ends (finished, client gone, error),
    so a client that disconnects mid-stream always frees its engine slot."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
