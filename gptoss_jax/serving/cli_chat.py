"""``gptoss-jax chat``: an interactive harmony conversation in the terminal.

The reasoning (analysis channel) is printed dimmed on stderr, apart from the answer. Commands:
``/reset`` starts over, ``/effort low|medium|high`` changes the reasoning effort, ``/exit`` (or
Ctrl-D) quits; Ctrl-C stops the current answer, and at the prompt only clears the line (the
conversation is kept).
"""
from __future__ import annotations

import argparse
import sys

from gptoss_jax.harmony import REASONING_EFFORTS
from gptoss_jax.serving import options

HELP = "commands: /reset, /effort low|medium|high, /exit"
INTERRUPT_HINT = "(Ctrl-C clears the line; /exit or Ctrl-D quits)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_chat_arguments(parser)
    options.add_model_arguments(parser)
    options.add_sampling_arguments(parser, max_tokens=2048)


validate = options.validate


def chat(engine, fmt, args: argparse.Namespace, read=input, err=None) -> None:
    """The read-generate-print loop; ``read(prompt) -> str`` raises EOFError to end (Ctrl-D), and
    KeyboardInterrupt (Ctrl-C) to ask again."""
    from gptoss_jax.serving.console import Printer, stream_chat

    err = err or sys.stderr
    effort = args.reasoning_effort
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print(f"chatting with {args.ckpt} (reasoning effort {effort}); {HELP}", file=err)
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            print(file=err)
            return
        except KeyboardInterrupt:
            print(f"\n{INTERRUPT_HINT}", file=err)
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(conversation cleared)", file=err)
            continue
        if line.startswith("/effort"):
            value = line.removeprefix("/effort").strip()
            if value in REASONING_EFFORTS:
                effort = value
                print(f"(reasoning effort {effort})", file=err)
            else:
                print(f"(usage: /effort {'|'.join(REASONING_EFFORTS)})", file=err)
            continue
        if line.startswith("/"):
            print(f"(unknown command; {HELP})", file=err)
            continue
        turn = history + [{"role": "user", "content": line}]
        try:
            result = stream_chat(engine, fmt, system + turn, options.sampling_params(args),
                                 Printer(err=err, show_reasoning=not args.hide_reasoning), reasoning_effort=effort)
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"error: {e} (/reset to start over)", file=err)
            continue
        out = result.output
        history = turn + [{"role": "assistant", "content": out.content, "reasoning_content": out.reasoning}]


def run(args: argparse.Namespace) -> int:
    from gptoss_jax.harmony import ChatFormat

    fmt = ChatFormat(args.vocab)
    engine = options.build_engine(args.ckpt, args)
    try:
        chat(engine, fmt, args)
    finally:
        engine.stop()
    return 0
