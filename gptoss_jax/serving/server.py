"""OpenAI-compatible HTTP server over the batched decoding engine.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``
(streaming SSE or not), ``POST /v1/completions`` (:mod:`gptoss_jax.serving.completions`), ``POST
/v1/responses`` and ``GET``/``DELETE /v1/responses/{id}`` (:mod:`gptoss_jax.serving.responses`).
Reasoning (the analysis channel) is returned as ``reasoning_content`` apart from ``content``; function ``tools`` come back as ``tool_calls`` with finish_reason ``"tool_calls"``.
All concurrent requests are submitted to one engine, which decodes them in one batch. Every error,
inside a stream too, is JSON in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Untrusted input: a body over ``max_request_bytes`` is refused (413) as it arrives; parsing, validation
and rendering run in worker processes (:mod:`gptoss_jax.serving.prompts`) with a time budget, so the
event loop (``/health``, streams) never waits on them. On shutdown, :func:`begin_shutdown` (called when
the listener closes) lets requests run ``shutdown_timeout`` seconds, then ends them with finish_reason
``"length"``, a complete response and, for streams, the final chunk and ``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from gptoss_jax.harmony import ChatFormat
from gptoss_jax.serving import constrain, responses
from gptoss_jax.serving.api import MAX_SEED, ApiError, ChatCompletionRequest, validation_error
from gptoss_jax.serving.choice import Choice, delta_json
from gptoss_jax.serving.completions import add_completion_routes
from gptoss_jax.serving.prompts import Preparer
from gptoss_jax.serving.streams import merge as _merge
from gptoss_jax.serving.workers import WorkerPool

log = logging.getLogger(__name__)

#: how often a non-streaming request checks whether its client is still there (seconds)
DISCONNECT_POLL_S = 0.5
#: default request body cap: the longest prompt a 131,072-token context holds is ~0.5 MB of text (about
#: 4 bytes a token), ~3 MB as JSON in the worst escaping (\uXXXX, 6 bytes a UTF-16 unit); 8 MiB leaves
#: room for tool schemas and history while bounding what one request can make the server hold and parse
MAX_REQUEST_BYTES = 8 << 20
#: a body over the cap is still read (and discarded, up to this much) so the client sees the 413
DRAIN_BYTES = 64 << 20


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    """What the routes share: the engine and its renderer, the requests in flight, counters, shutdown.

    context: tokens per sequence (prompt + generated) of the engine; default_params: the
    SamplingParams whose fields a request overrides; api_key: when set, requests to /v1 need
    ``Authorization: Bearer <api_key>``; renderer: the worker pool preparing prompts.
    """

    def __init__(self, engine, fmt: ChatFormat, model_name: str, *, context: int, default_params,
                 api_key: str | None, renderer: WorkerPool):
        self.engine, self.fmt, self.model_name, self.context = engine, fmt, model_name, context
        self.default_params, self.api_key, self.renderer = default_params, api_key, renderer
        self.live: dict = {}  # engine request -> Choice, for the requests the server is waiting on
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0}
        self.draining = self.ended = False
        self.created = int(time.time())

    # ------------------------------------------------------------ shutdown
    def begin_shutdown(self, timeout: float) -> None:
        """Stop taking requests; after ``timeout`` seconds end those still running (finish_reason "length")."""
        self.draining = True
        log.info("shutting down: %d requests in flight get %g s to finish", len(self.live), timeout)
        asyncio.get_running_loop().call_later(timeout, self.end_all)

    def end_all(self) -> None:
        self.ended = True
        if self.live:
            log.warning("shutdown timeout: ending %d requests (finish_reason 'length')", len(self.live))
        for c in list(self.live.values()):
            c.end()

    # ------------------------------------------------------------ requests
    async def authorize(self, authorization: str | None = Header(None)) -> None:
        if self.api_key is None:
            return
        if not authorization:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(authorization.removeprefix("Bearer ").strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gptoss-jax"}

    def find_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist (this server has '{self.model_name}')",
                           param="model", code="model_not_found")

    def health(self) -> dict:
        return {"status": "shutting_down" if self.draining else "ok", "model": self.model_name,
                "context": self.context, "requests_in_flight": len(self.live), "rendering": self.renderer.busy,
                **self.counters, "engine": engine_status(self.engine)}

    async def prepare(self, raw: bytes, kind: str = "chat", *extra):
        """The request and its prompt ids, from a render worker (:class:`Preparer`: ``kind`` names the
        endpoint, ``extra`` goes to its method); ApiError for a bad request."""
        try:
            result = await self.renderer.acall((kind, raw, *extra))
        except TimeoutError:
            raise ApiError(413, f"Rendering this request took longer than the server's {self.renderer.timeout:g} s "
                                "budget: send a shorter one", code="render_timeout") from None
        if result[0] == "error":
            raise ApiError.from_body(*result[1:])
        return result[1], result[2]

    def sampling(self, body, index: int, max_tokens: int | None):
        """The SamplingParams of choice ``index`` of ``body`` (a :class:`Sampling` request)."""
        fields = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "seed", "presence_penalty",
                                                "frequency_penalty") if getattr(body, k) is not None}
        fields["logit_bias"] = body.bias_pairs()
        if body.seed is not None:
            fields["seed"] = (body.seed + index) % (MAX_SEED + 1)  # n > 1: distinct but reproducible
        fields["max_tokens"] = max_tokens or self.default_params.max_tokens
        # the schema bounds every field; the engine stops at the end of the context whatever max_tokens says
        return dataclasses.replace(self.default_params, **fields)

    @staticmethod
    def refuse_unsupported(body) -> None:
        """400 ``unsupported_parameter`` naming the first field of ``body`` (a :class:`Refusing`) that this
        server does not do and that would change the answer."""
        if refused := body.unsupported():
            name, value = refused
            raise ApiError(400, f"'{name}' is not supported by this server (got {json.dumps(value)})",
                           param=name, code="unsupported_parameter")

    def check_length(self, prompt: list[int], param: str = "messages") -> None:
        if len(prompt) >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the {param} "
                                f"take {len(prompt)} tokens", param=param, code="context_length_exceeded")

    def submit(self, body: ChatCompletionRequest, prompt: list[int]) -> list[Choice]:
        """One engine request per choice of a chat completion."""
        self.check_length(prompt)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = [self.sampling(body, i, body.max_completion_tokens or body.max_tokens) for i in range(body.n)]
        extra = {"logprobs": True} if body.logprobs else {}  # log-probabilities kept per generated token
        constraints = [constrain.request_constraint(body, p, self.fmt, self.engine) for p in params]
        choices = []
        try:
            for i, (p, constraint) in enumerate(zip(params, constraints)):
                kwargs = extra if constraint is None else {**extra, "constraint": constraint}
                choices.append(self.track(Choice(i, self.engine.submit(prompt, p, **kwargs), self.fmt, stops,
                                                 body.top_logprobs or 0)))
        except ValueError as e:  # the engine refused the prompt
            self.release(choices)
            raise ApiError(400, str(e), param="messages") from None
        return choices

    def track(self, choice):
        """Count ``choice`` as in flight (answered at once when it comes after the shutdown timeout)."""
        self.live[choice.request] = choice
        self.counters["requests"] += 1
        if self.ended:
            choice.end()
        return choice

    def release(self, choices) -> None:
        """The choices are over (finished, failed or abandoned): cancel what still runs, count them."""
        for c in choices:
            if c.request in self.live:
                del self.live[c.request]
                if c.finish_reason is None:
                    c.request.cancel()
                    self.counters["cancelled"] += 1
                else:
                    self.counters["completed"] += 1

    @staticmethod
    def usage(prompt: list[int], choices) -> dict:
        n = sum(c.tokens for c in choices)
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

    @staticmethod
    async def collect(request: Request, choices) -> None:
        """Run the choices to their end; a client that goes away frees its slots (ApiError 499)."""
        async def drain(c):
            async for _ in c.deltas():
                pass

        return await Server.wait_for_client(request, asyncio.gather(*(drain(c) for c in choices)))

    @staticmethod
    async def wait_for_client(request: Request, work) -> None:
        """Await ``work`` (a coroutine or future); a client that goes away cancels it (ApiError 499)."""
        work = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait([work], timeout=DISCONNECT_POLL_S)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise ApiError(499, "client disconnected")

    async def finish(self, request: Request, choices) -> None:
        """:meth:`collect`, then release the choices however it ended."""
        try:
            await self.collect(request, choices)
        finally:
            self.release(choices)

    async def sse(self, events, choices, frame=None, done: str = "data: [DONE]\n\n"):
        """Server-sent events of the ``events`` async iterator (dicts, each framed by ``frame``, by default
        ``data: ...``), errors as an error event, then ``done``; the choices are released however the
        stream ends."""
        frame = frame or _sse
        try:
            async for event in events:
                yield frame(event)
        except ApiError as e:
            yield _sse(e.body())
        except Exception as e:  # noqa: BLE001 - the response has started: the error goes in the stream
            log.exception("stream failed")
            yield _sse(ApiError(500, f"internal error: {type(e).__name__}", type_="server_error").body())
        finally:
            self.release(choices)
        if done:
            yield done

    def streaming(self, events, choices, **framing) -> "CancellingStream":
        """The streamed response of ``events`` (``framing``: :meth:`sse`'s frame and done)."""
        return CancellingStream(self.sse(events, choices, **framing), lambda: self.release(choices),
                                media_type="text/event-stream")


def create_app(engine, fmt: ChatFormat, model_name: str, *, context: int, default_params,
               api_key: str | None = None, reasoning_effort: str = "medium",
               max_request_bytes: int = MAX_REQUEST_BYTES, renderer: WorkerPool | None = None,
               responses_store: int = responses.DEFAULT_STORE) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name`` (arguments: :class:`Server`).

    max_request_bytes: the body cap (413 above); renderer: the worker pool preparing prompts
    (:func:`render_pool`; by default two workers, 10 s); responses_store: responses kept for
    ``previous_response_id`` (:class:`~gptoss_jax.serving.responses.ResponseStore`, ``app.state.responses``).
    ``app.state.begin_shutdown(timeout)`` starts the graceful shutdown (see the module docstring).
    """
    app = FastAPI(title="gptoss-jax", version="0.1.0")
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    server = Server(engine, fmt, model_name, context=context, default_params=default_params, api_key=api_key,
                    renderer=renderer or render_pool(fmt, context, reasoning_effort))
    app.state.server, app.state.renderer, app.state.begin_shutdown = server, server.renderer, server.begin_shutdown
    add_error_handlers(app)
    add_model_routes(app, server)
    add_chat_routes(app, server)
    add_completion_routes(app, server)
    app.state.responses = responses.ResponseStore(responses_store)
    responses.add_response_routes(app, server, app.state.responses, reasoning_effort)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON, whatever raised it."""
    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return ApiError(e.status_code, str(e.detail),
                        type_="invalid_request_error" if e.status_code < 500 else "server_error").response()

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}", type_="server_error").response()


def add_model_routes(app: FastAPI, server: Server) -> None:
    """``/health``, ``/v1/models`` and ``/v1/models/{id}``."""
    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models", dependencies=[Depends(server.authorize)])
    async def models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(server.authorize)])
    async def model(name: str):
        server.find_model(name)
        return server.model_card()


def add_chat_routes(app: FastAPI, server: Server) -> None:
    """``/v1/chat/completions``, streaming or not."""
    @app.post("/v1/chat/completions", dependencies=[Depends(server.authorize)])
    async def chat_completions(request: Request):
        body, prompt = await server.prepare(await request.body())
        server.find_model(body.model)
        server.refuse_unsupported(body)
        choices = server.submit(body, prompt)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return server.streaming(chat_chunks(head, prompt, choices, include_usage), choices)
        await server.finish(request, choices)
        return {**head, "object": "chat.completion",
                "choices": [{"index": c.index, "message": c.message(), "logprobs": c.logprobs_json(),
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": Server.usage(prompt, choices)}


async def chat_chunks(head: dict, prompt: list[int], choices: list[Choice], include_usage: bool):
    """The chat.completion.chunk objects of a streamed chat completion."""
    def chunk(index: int, delta: dict, finish_reason=None) -> dict:
        lp = choices[index].logprobs_json(new_only=True) if "content" in delta and delta["content"] else None
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]}

    def one(c: Choice):
        async def it():
            yield {"role": "assistant", "content": ""}
            async for d in c.deltas():
                yield delta_json(d)
        return it()

    async for i, delta in _merge([one(c) for c in choices]):
        yield chunk(i, delta)
    for c in choices:
        yield chunk(c.index, {}, c.finish_reason)
    if include_usage:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": Server.usage(prompt, choices)}


def render_pool(fmt: ChatFormat, context: int, reasoning_effort: str = "medium", *, workers: int = 2,
                timeout: float = 10.0) -> WorkerPool:
    """Worker processes turning request bodies into prompts (:class:`Preparer`) within ``timeout`` seconds."""
    return WorkerPool(Preparer, (fmt.vocab, context, reasoning_effort), workers=workers, timeout=timeout)


class BodyLimit:
    """ASGI middleware: reads each request's body before the app, refusing (413) one over ``max_bytes``
    as soon as its Content-Length or the bytes received so far (chunked bodies) say so; the rest of
    such a body is read and dropped (up to ``DRAIN_BYTES``), never kept."""

    def __init__(self, app, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > self.max_bytes
        chunks, size, more = [], 0, True
        while more and not too_large:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            too_large = size > self.max_bytes
            chunks.append(chunk)
        if too_large:
            chunks.clear()
            dropped = size
            while more and dropped < DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return
                dropped, more = dropped + len(message.get("body", b"")), message.get("more_body", False)
            error = ApiError(413, f"The request body is over this server's limit of {self.max_bytes} bytes "
                                  "(--max-request-bytes)", code="request_too_large")
            return await error.response()(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def engine_status(engine) -> dict:
    """The engine's :meth:`~gptoss_jax.decode.engine.Engine.status` (for /health; {} for a stand-in without one)."""
    return engine.status() if hasattr(engine, "status") else {}


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
