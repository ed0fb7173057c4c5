"""``python -m convert SRC DST`` (same options as ``gptoss-jax convert``)."""
from __future__ import annotations

import argparse
import logging
import sys

from convert import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="convert an official checkpoint folder to Orbax (or back with --to-official)",
        epilog="examples:\n" + cli.__doc__.split("\n", 1)[1].strip("\n"))
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
