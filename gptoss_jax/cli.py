"""What every command module shares: the user-error type and the one-line-error argument parser
(the ``gptoss-jax`` dispatcher itself is :mod:`gptoss_cli.main`, on top of the library and the apps)."""
from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """A user error found before anything loads (the message names the argument and the problem)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: MESSAGE (see PROG --help)`` on stderr, exit status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
