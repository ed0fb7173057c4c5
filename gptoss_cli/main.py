"""The ``gptoss-jax`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``,
and optionally ``validate(args)`` (checks that need the file system or the devices, run before ``run``
loads anything); modules are imported only when their command runs, so ``gptoss-jax --help`` stays fast.
This package sits on top: it imports the library (``gptoss_jax``) and the apps (``convert``, ``train``),
and nothing imports it.

User errors (a bad argument, a missing or malformed checkpoint or vocabulary) print one line
``error: ...`` on stderr and exit with status 2; ``--log-level DEBUG`` shows their traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.safetensors_file import SafetensorsError
from gptoss_jax.cli import Parser, UsageError, one_line
from gptoss_jax.config import ConfigError
from gptoss_jax.tokenizer import VocabError

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert.cli", "convert an official checkpoint folder to Orbax (or back with --to-official)"),
    "generate": ("gptoss_jax.serving.cli_generate", "generate text from a prompt (streams)"),
    "chat": ("gptoss_jax.serving.cli_chat", "interactive chat in the harmony format"),
    "serve": ("gptoss_jax.serving.cli_serve", "OpenAI-compatible HTTP server"),
    "demo": ("gptoss_cli.demo", "make a tiny random checkpoint, convert it and serve/generate end to end"),
    "train": ("train.cli", "LoRA or full fine-tuning"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose message is the whole story for a user (no traceback)."""
    return UsageError, CheckpointError, SafetensorsError, ConfigError, VocabError


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = Parser(prog="gptoss-jax", description="gpt-oss in JAX: convert, generate, chat, serve, train")
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help="logging level (DEBUG, INFO, WARNING); DEBUG also shows tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:  # JAX's backend probing ("Unable to initialize backend 'tpu'")
        logging.getLogger("jax").setLevel(logging.WARNING)
    module_name, help_ = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"gptoss-jax {args.command}: not available in this build ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    cmd = Parser(prog=f"gptoss-jax {args.command}", description=help_)
    module.add_arguments(cmd)
    cmd_args = cmd.parse_args(rest)
    try:
        if hasattr(module, "validate"):
            module.validate(cmd_args)
        return int(module.run(cmd_args) or 0)
    except user_errors() as e:
        if args.log_level == "DEBUG":
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
