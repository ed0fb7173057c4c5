"""``gptoss-jax serve``: the OpenAI-compatible HTTP server (127.0.0.1:8000 by default).

    gptoss-jax serve --ckpt gpt-oss-20b
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "Hi"}]}'
"""
from __future__ import annotations

import argparse
import logging
import os

from gptoss_jax.serving import options

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


def validate(args: argparse.Namespace) -> None:
    """Before the model loads: the shared checks and that ``--host:--port`` is free."""
    options.validate(args)
    options.check_port(args.host, args.port)


def model_name(args: argparse.Namespace, ckpt: str) -> str:
    return args.model_name or os.path.basename(os.path.normpath(ckpt))


def serve(engine, fmt, args: argparse.Namespace, name: str) -> None:
    """Run the server on ``engine`` until interrupted (the caller stops the engine)."""
    import uvicorn

    from gptoss_jax.serving.server import create_app

    app = create_app(engine, fmt, name, context=engine.context, default_params=options.sampling_params(args),
                     api_key=args.api_key, reasoning_effort=args.reasoning_effort)
    log.info("serving %s at http://%s:%d/v1 (API key %s)", name, args.host, args.port,
             "required" if args.api_key else "not required")
    uvicorn.run(app, host=args.host, port=args.port, log_level=logging.getLevelName(log.getEffectiveLevel()).lower(),
                timeout_graceful_shutdown=5)


def run(args: argparse.Namespace) -> int:
    from gptoss_jax.harmony import ChatFormat

    fmt = ChatFormat(args.vocab)
    engine = options.build_engine(args.ckpt, args)
    try:
        serve(engine, fmt, args, model_name(args, args.ckpt))
    finally:
        engine.stop()
    return 0
