"""``gptoss-jax serve``: the OpenAI-compatible HTTP server (127.0.0.1:8000 by default).

    gptoss-jax serve --ckpt gpt-oss-20b
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Hi"}]}'
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal

from gptoss_jax.serving import options

MAX_REQUEST_BYTES = 8 << 20  # = gptoss_jax.serving.server.MAX_REQUEST_BYTES (not imported: FastAPI loads slowly)
RESPONSES_STORE = 256  # = gptoss_jax.serving.responses.DEFAULT_STORE (not imported, as above)
#: after --shutdown-timeout, the seconds the ended requests get to send their last bytes
SHUTDOWN_GRACE_S = 5.0

log = logging.getLogger(__name__)
API_KEY_ENV = "GPTOSS_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    options.add_chat_arguments(parser, console=False)
    options.add_model_arguments(parser, max_batch=8)
    options.add_sampling_arguments(parser, max_tokens=4096)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    g.add_argument("--port", type=options.integer(0, 65535), default=8000)
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default ${API_KEY_ENV}; none = open)")
    g.add_argument("--model-name", default=None, help="model id clients send (default: the checkpoint folder's name)")
    g.add_argument("--max-request-bytes", type=options.integer(1024), default=MAX_REQUEST_BYTES,
                   help=f"refuse larger request bodies with 413 (default {MAX_REQUEST_BYTES >> 20} MiB)")
    g.add_argument("--render-workers", type=options.integer(1, 64), default=2,
                   help="processes parsing and rendering requests off the event loop (default 2)")
    g.add_argument("--render-timeout", type=options.real(0, low_open=True), default=10.0,
                   help="seconds one request may take to parse and render before a 413 (default 10)")
    g.add_argument("--prefix-cache-blocks", type=options.integer(0), default=0,
                   help="prompt blocks (of --prefill-chunk tokens each) whose KV is kept for later requests sharing "
                        "a prefix, least recently used evicted (0 = off; hit rate on /health)")
    g.add_argument("--responses-store", type=options.integer(0), default=RESPONSES_STORE,
                   help="finished /v1/responses kept in memory for previous_response_id and GET /v1/responses/{id}, "
                        f"least recently used dropped first (0 = none; default {RESPONSES_STORE})")
    g.add_argument("--shutdown-timeout", type=options.real(0), default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds in-flight requests may still run before they are ended "
                        "with finish_reason 'length' (default 30)")


def validate(args: argparse.Namespace) -> None:
    """Before the model loads: the shared checks and that ``--host:--port`` is free."""
    options.validate(args)
    options.check_port(args.host, args.port)


def model_name(args: argparse.Namespace, ckpt: str) -> str:
    return args.model_name or os.path.basename(os.path.normpath(ckpt))


def serve(engine, fmt, args: argparse.Namespace, name: str, renderer=None) -> None:
    """Run the server on ``engine`` until SIGTERM/SIGINT, then shut down gracefully (the caller stops
    the engine): the listener closes, requests in flight get ``--shutdown-timeout`` seconds, then end."""
    import uvicorn

    from gptoss_jax.serving.server import create_app, render_pool

    if renderer is None:
        renderer = render_pool(fmt, engine.context, args.reasoning_effort, workers=args.render_workers,
                               timeout=args.render_timeout)
        renderer.wait_ready()
    app = create_app(engine, fmt, name, context=engine.context, default_params=options.sampling_params(args),
                     api_key=args.api_key, reasoning_effort=args.reasoning_effort,
                     max_request_bytes=args.max_request_bytes, renderer=renderer,
                     responses_store=args.responses_store)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.begin_shutdown(args.shutdown_timeout)
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # shut down gracefully: exit 0 after the caller's cleanup, rather than uvicorn re-raising SIGTERM
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    log.info("serving %s at http://%s:%d/v1 (API key %s)", name, args.host, args.port,
             "required" if args.api_key else "not required")
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=logging.getLevelName(log.getEffectiveLevel()).lower(),
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_GRACE_S)
    Server(config).run()


def run(args: argparse.Namespace) -> int:
    from gptoss_jax.harmony import ChatFormat
    from gptoss_jax.serving.server import render_pool

    fmt = ChatFormat(args.vocab)
    engine = None
    # the render workers start while the model loads
    renderer = render_pool(fmt, args.context, args.reasoning_effort, workers=args.render_workers,
                           timeout=args.render_timeout)
    try:
        engine = options.build_engine(args.ckpt, args)
        renderer.wait_ready()
        serve(engine, fmt, args, model_name(args, args.ckpt), renderer)
    finally:
        renderer.close()
        if engine is not None:
            engine.stop()
    return 0
