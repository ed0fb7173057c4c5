"""``gptoss-jax train CONFIG`` / ``python -m train CONFIG``: LoRA or full fine-tuning from a config file.

Any field can be overridden: ``--set lora.rank=8`` (repeatable) or ``--lora.rank 8`` /
``--lora.rank=8``; values use TOML syntax (``--data.train '["a.jsonl", "b.jsonl"]'``).
"""
from __future__ import annotations

import argparse
import logging
import sys

from train.config import TrainConfigError, load, parse_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (.toml or .json)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set lora.rank=8 (repeatable)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="more overrides as --FIELD VALUE or --FIELD=VALUE (dotted names, e.g. --optimizer.learning_rate 1e-4)")


def parse_overrides(sets: list[str], rest: list[str]) -> list[tuple[str, object]]:
    """``--set a.b=1`` entries and ``--a.b 1`` / ``--a.b=1`` flags -> [(dotted key, value)]."""
    pairs = [("set", item) for item in sets]
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--") or len(flag) == 2:
            raise TrainConfigError(f"unexpected argument {flag!r}; overrides look like --lora.rank 8 or --set lora.rank=8")
        key, eq, value = flag[2:].partition("=")
        if not eq or key == "set":
            if i + 1 >= len(rest):
                raise TrainConfigError(f"{flag}: missing value")
            value, i = (rest[i + 1] if not eq else value), i + (0 if eq else 1)
        pairs.append((key, value))
        i += 1
    out = []
    for key, value in pairs:
        if key == "set":
            item = value
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise TrainConfigError(f"--set {item!r}: expected FIELD=VALUE")
        out.append((key.strip().replace("-", "_"), parse_value(value)))
    return out


def run(args: argparse.Namespace) -> int:
    from train.data import DataError
    from train.trainer import TrainingError, train

    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save INFO chatter
    try:
        cfg = load(args.config, parse_overrides(args.set, args.overrides))
        summary = train(cfg)
    except (TrainConfigError, DataError, TrainingError) as e:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2  # a bad config or data file is the user's: 2
    print(f"final loss {summary['final_loss']}; metrics {summary['metrics']}; loss curve {summary['loss_png']}; "
          f"checkpoints {summary['checkpoints']}" + (f"; merged model {summary['merged']}" if "merged" in summary else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)
