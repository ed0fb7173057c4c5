"""Atomic output folders: write into a hidden temporary sibling, rename over the destination on success.

``.NAME.tmp-PID-XXXXXX`` lives beside ``NAME`` (same file system, so the final rename is atomic).
On any exception the temporary folder is removed and the exception propagates; a writer killed
outright (SIGKILL, power loss) leaves only the temporary folder, which the next write to the same
destination removes once its process is gone. Disk-full failures are reported as ``OSError`` with
``ENOSPC``/``EFBIG`` and the folder being written.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import secrets
import shutil

log = logging.getLogger("convert")

_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk (or the file size limit) ran out while writing; nothing was kept."""


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh temporary folder; on success it becomes ``dst`` (replacing it if ``overwrite``)."""
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.split(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(errno.EEXIST, f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    os.makedirs(parent, exist_ok=True)
    remove_stale(dst)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if os.path.lexists(dst):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(3)}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            _remove(old)
        else:
            os.rename(tmp, dst)
        _fsync(parent)
    except BaseException as e:
        _remove(tmp)
        full = disk_full_error(e, dst)
        if full is not None:
            raise full from e
        raise


def remove_stale(dst: str) -> None:
    """Remove temporary folders of earlier writes to ``dst`` whose process has ended."""
    parent, name = os.path.split(os.path.abspath(dst))
    for path in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*-*")):
        pid = os.path.basename(path)[len(name) + 6:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted write (process %s)", path, pid)
            _remove(path)


def disk_full_error(e: BaseException, dst: str) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``dst`` when ``e`` (an OSError, or TensorStore's error text) says
    the disk is full or a file grew past the size limit; None otherwise."""
    if isinstance(e, DiskFullError):
        return None
    code = getattr(e, "errno", None)
    if code not in _DISK_FULL:
        text = str(e)
        code = next((c for c in _DISK_FULL if f"os_error_code='{c}'" in text or f"[Errno {c}]" in text), None)
    if code is None:
        return None
    return DiskFullError(code, f"{dst}: out of disk space while writing ({os.strerror(code)}); nothing was kept. "
                               f"Free space or choose another destination. Cause: {e}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
