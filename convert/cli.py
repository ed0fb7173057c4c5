"""``gptoss-jax convert`` / ``python -m convert``: official folder -> our Orbax folder, or back.

    gptoss-jax convert gpt-oss-20b gpt-oss-20b-jax                    # experts stay MXFP4
    gptoss-jax convert gpt-oss-20b gpt-oss-20b-jax-bf16 --experts bf16
    gptoss-jax convert --to-official gpt-oss-20b-jax gpt-oss-20b-hf   # export (transformers layout)
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from gptoss_jax.checkpoint.names import LAYOUTS

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="official checkpoint folder (transformers root or original/); with "
                                    "--to-official, a folder written by convert")
    parser.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--to-official", action="store_true",
                        help="export SRC (our folder) to the official transformers layout at DST")
    parser.add_argument("--experts", choices=("mxfp4", "bf16"), default="mxfp4",
                        help="mxfp4: keep experts packed as in the checkpoint (default); bf16: store them dequantized")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype of the non-expert weights written (default bfloat16, the official dtype)")
    parser.add_argument("--layout", choices=LAYOUTS, help="force the source layout (default: detected)")
    parser.add_argument("--max-shard-size", default="4.8GB",
                        help="with --to-official: largest safetensors shard (default 4.8GB, as published)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")


def run(args: argparse.Namespace) -> int:
    from convert.progress import parse_bytes

    progress = False if args.no_progress else None
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU backend" notices
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM cleans up like Ctrl-C
    try:
        if args.to_official:
            if args.experts != "mxfp4" or args.layout:
                raise ValueError("--experts and --layout apply to conversion, not to --to-official")
            from convert.export import export_official

            export_official(args.src, args.dst, progress=progress, dtype=args.dtype,
                            max_shard_bytes=parse_bytes(args.max_shard_size), overwrite=args.overwrite)
        else:
            from convert.to_orbax import convert_checkpoint

            convert_checkpoint(args.src, args.dst, experts=args.experts, dtype=args.dtype, layout=args.layout,
                               progress=progress, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # CheckpointError, SafetensorsError, ConfigError, FileExistsError, disk full
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        # the user's input (bad folder, existing DST): 2, like a usage error; the system's (disk full): 1
        return 2 if isinstance(e, (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError)) else 1
    except KeyboardInterrupt:
        print("convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt
