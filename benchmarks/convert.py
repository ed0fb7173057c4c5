"""Conversion benchmark on a synthetic full-size checkpoint.

Writes a random-weight checkpoint with the real shapes and dtypes in the official transformers layout
(``convert.synthetic.write_random_checkpoint``; 20b: 3 shards of <= 4.8 GB, 13.76 GB), then runs, each
in a fresh process measured from outside (wall time, peak RSS of that process):

1. ``python -m convert SRC DST``                 official -> our Orbax folder (MXFP4 kept packed)
2. ``python -m convert --to-official DST OUT``   back to the transformers layout
3. a streaming byte-for-byte comparison of every tensor of OUT with SRC
4. with ``--load``: ``gptoss_jax.load`` of SRC and of DST (bf16, packed experts) on the host

    python benchmarks/convert.py --preset gpt-oss-20b --workdir /tmp/convert-bench
    python benchmarks/convert.py --preset gpt-oss-120b --layers 6 --workdir /tmp/convert-bench

``--layers`` keeps a preset's shapes with fewer layers (peak memory is set by the largest group, so it
does not depend on the layer count; time scales with the bytes). Everything written is deleted at the
end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from convert.shards import MAX_SHARD_BYTES  # noqa: E402
from gptoss_jax.checkpoint.official import open_checkpoint  # noqa: E402
from convert.progress import human_bytes  # noqa: E402
from convert.synthetic import write_random_checkpoint  # noqa: E402
from gptoss_jax.config import PRESETS  # noqa: E402

#: Runs a command as its only child and reports that child's wall time and peak RSS.
_MEASURE = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "rc = subprocess.call(sys.argv[1:])\n"
            "seconds = time.perf_counter() - t\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
            "print(json.dumps({'rc': rc, 'seconds': seconds, 'peak_rss': peak}))\n")


def measured(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], cwd=ROOT, env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {result['rc']}")
    return result


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def same_tensors(a: str, b: str) -> int:
    """Compare every tensor of two official folders, one tensor at a time; returns the count."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.files) != set(cb.files):
        raise SystemExit(f"tensor names differ: {sorted(set(ca.files) ^ set(cb.files))[:5]}")
    for name in ca.files:
        x, y = ca.read(name), cb.read(name)
        if x.dtype != y.dtype or x.shape != y.shape or hashlib.sha256(x).digest() != hashlib.sha256(y).digest():
            raise SystemExit(f"tensor {name} differs after the round trip")
    return len(ca.files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, help="override the number of layers (same shapes otherwise)")
    p.add_argument("--workdir", default="/tmp/convert-bench")
    p.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES)
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--load", action="store_true", help="also time gptoss_jax.load of both folders (needs RAM for the model)")
    p.add_argument("--keep", action="store_true", help="keep the folders written")
    args = p.parse_args()

    cfg = PRESETS[args.preset]
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers, layer_types=None)
    name = args.preset + (f" ({args.layers} layers)" if args.layers else "")
    src, dst, out = (os.path.join(args.workdir, n) for n in ("official", "converted", "exported"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    results: dict = {"model": name, "cpu_count": os.cpu_count()}
    try:
        t = time.perf_counter()
        write_random_checkpoint(src, cfg, max_shard_bytes=args.max_shard_bytes)
        shards = [f for f in os.listdir(src) if f.endswith(".safetensors")]
        results.update(source_bytes=folder_bytes(src), source_shards=len(shards),
                       write_synthetic_s=time.perf_counter() - t)
        print(f"{name}: wrote {len(shards)} shards, {human_bytes(results['source_bytes'])} in "
              f"{results['write_synthetic_s']:.1f} s", flush=True)

        r = measured([sys.executable, "-m", "convert", src, dst, "--no-progress", "--log-level", "WARNING"])
        results.update(convert_s=r["seconds"], convert_peak_rss=r["peak_rss"], converted_bytes=folder_bytes(dst))
        print(f"convert: {r['seconds']:.1f} s, peak RSS {human_bytes(r['peak_rss'])}, "
              f"{human_bytes(results['source_bytes'] / r['seconds'])}/s", flush=True)

        if not args.skip_export:
            r = measured([sys.executable, "-m", "convert", "--to-official", dst, out, "--no-progress",
                          "--log-level", "WARNING", "--max-shard-size", str(args.max_shard_bytes)])
            results.update(export_s=r["seconds"], export_peak_rss=r["peak_rss"])
            print(f"export: {r['seconds']:.1f} s, peak RSS {human_bytes(r['peak_rss'])}", flush=True)
            t = time.perf_counter()
            results["round_trip_identical_tensors"] = same_tensors(src, out)
            print(f"round trip: {results['round_trip_identical_tensors']} tensors byte-identical "
                  f"(checked in {time.perf_counter() - t:.1f} s)", flush=True)
            shutil.rmtree(out)

        if args.load:
            for label, path in (("official", src), ("converted", dst)):
                r = measured([sys.executable, "-c", f"import gptoss_jax; gptoss_jax.load({path!r})"])
                results.update({f"load_{label}_s": r["seconds"], f"load_{label}_peak_rss": r["peak_rss"]})
                print(f"load {label}: {r['seconds']:.1f} s, peak RSS {human_bytes(r['peak_rss'])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
