"""``gptoss-jax generate``: one prompt in, text streamed out.

By default the prompt is a user message in the harmony chat format (reasoning printed apart, on
stderr); ``--raw`` continues the prompt as plain text.
"""
from __future__ import annotations

import argparse
import sys

from gptoss_jax.serving import options
from gptoss_jax.tokenizer import STOP_TOKEN_IDS

#: raw completion also stops at <|endoftext|>, like gpt_oss/generate.py
RAW_STOP = ("<|endoftext|>",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    parser.add_argument("--raw", action="store_true", help="plain text completion instead of a chat turn")
    options.add_chat_arguments(parser)
    options.add_model_arguments(parser)
    options.add_sampling_arguments(parser)


validate = options.validate


def generate(engine, fmt, args: argparse.Namespace, prompt: str):
    """Stream one generation for ``prompt`` to stdout/stderr; returns the console Result."""
    from gptoss_jax.serving.console import Printer, stream_chat, stream_raw

    printer = Printer(show_reasoning=not args.hide_reasoning)
    if getattr(args, "raw", False):
        stops = STOP_TOKEN_IDS + tuple(fmt.tokenizer.encode_single_token(t) for t in RAW_STOP)
        return stream_raw(engine, fmt, prompt, options.sampling_params(args, stops), printer)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    return stream_chat(engine, fmt, messages, options.sampling_params(args), printer,
                       reasoning_effort=args.reasoning_effort)


def run(args: argparse.Namespace) -> int:
    from gptoss_jax.harmony import ChatFormat

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    fmt = ChatFormat(args.vocab)
    engine = options.build_engine(args.ckpt, args)
    try:
        generate(engine, fmt, args, prompt)
    finally:
        engine.stop()
    return 0
