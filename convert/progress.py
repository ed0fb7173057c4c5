"""Progress of long conversions: a tqdm bar (tensors, bytes, bytes/s) on a terminal, quiet otherwise.

``progress`` arguments across :mod:`convert` mean: ``None`` = automatic (a bar when stderr is a
terminal, nothing otherwise), ``True`` = always a bar, ``False`` = no bar, a callable = called with
the byte count of each tensor done (like :func:`convert.synthetic.write_random_checkpoint`). Stage
lines go to the ``convert`` logger at INFO either way, so logs stay one line per stage.
"""
from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """Counts tensors and bytes of one stage; ``update(nbytes)`` per tensor, ``close()`` at the end."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int,
                 progress: bool | Callable[[int], None] | None = None):
        self.total_tensors = total_tensors
        self.tensors = 0
        self.bytes = 0
        self.start = time.perf_counter()
        self._callback = progress if callable(progress) else None
        show = progress is True or (progress is None and sys.stderr.isatty())
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             dynamic_ncols=True, leave=True, file=sys.stderr)
            self._bar.set_postfix_str(f"0/{total_tensors} tensors")

    def update(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
            self._bar.update(nbytes)
        if self._callback is not None:
            self._callback(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> str:
        """'459 tensors, 12.82 GiB in 41.2 s (318.5 MiB/s)'."""
        seconds = time.perf_counter() - self.start
        rate = self.bytes / max(seconds, 1e-9)
        return f"{self.tensors} tensors, {human_bytes(self.bytes)} in {seconds:.1f} s ({human_bytes(rate)}/s)"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def parse_bytes(text: str) -> int:
    """'4.8GB' / '500MB' / '64KiB' / '1000' -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    try:
        value = float(number) * units[s[len(number):]]
    except (KeyError, ValueError):
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 4.8GB, 500MB or 64MiB") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)
