"""The ``gptoss-jax`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``gptoss-jax --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("convert.cli", "convert an official checkpoint folder to Orbax (or back with --to-official)"),
    "generate": ("gptoss_jax.serving.cli_generate", "generate text from a prompt (streams)"),
    "chat": ("gptoss_jax.serving.cli_chat", "interactive chat in the harmony format"),
    "serve": ("gptoss_jax.serving.cli_serve", "OpenAI-compatible HTTP server"),
    "demo": ("gptoss_jax.serving.cli_demo", "make a tiny random checkpoint, convert it and serve/generate end to end"),
    "train": ("train.cli", "LoRA or full fine-tuning"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gptoss-jax", description="gpt-oss in JAX: convert, generate, chat, serve, train")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    cmd = argparse.ArgumentParser(prog=f"gptoss-jax {args.command}", description=help_)
    module.add_arguments(cmd)
    return int(module.run(cmd.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
