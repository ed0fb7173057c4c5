"""A pool of worker processes with a time budget per call, for work on untrusted input.

Each worker builds its handler once (``factory(*args)``) and then answers one payload at a time. A call
still running after ``timeout`` seconds has its worker killed (a fresh one is started in its place) and
raises :class:`TimeoutError`; a worker that dies raises :class:`WorkerDied`. The work runs in other
processes, so the caller's event loop (and its GIL) stays free whatever the input.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import queue
import time

log = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """The worker process ended while handling a payload (it is replaced)."""


def _serve(conn, factory, args) -> None:
    """Worker process main: build the handler, say ready, answer payloads until the pipe closes."""
    try:
        handler = factory(*args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            payload = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # the parent is gone or closed the pool
            return
        try:
            conn.send(("ok", handler(payload)))
        except BaseException as e:  # noqa: BLE001 - e.g. a pyo3 PanicException: keep serving
            log.exception("worker call failed")
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, factory, args):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, factory, args), daemon=True, name="gptoss-render")
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerDied(f"worker exited with {self.process.exitcode} while starting") from None
        if kind != "ready":
            raise RuntimeError(f"worker failed to start: {detail}")
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class WorkerPool:
    """``workers`` processes running ``factory(*args)``'s handler; :meth:`call` (blocking) or
    :meth:`acall` (asyncio) hands one a payload and returns the handler's result."""

    def __init__(self, factory, args: tuple = (), *, workers: int = 2, timeout: float = 10.0):
        if workers < 1 or not timeout > 0:
            raise ValueError(f"need workers >= 1 and timeout > 0, got {workers}, {timeout}")
        self.factory, self.args, self.timeout = factory, args, timeout
        self._ctx = multiprocessing.get_context("spawn")  # the server runs threads (JAX): no fork
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(workers):
            self._idle.put(_Worker(self._ctx, factory, args))
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="gptoss-render")
        self.workers = workers
        self.busy = 0  # calls being handled now

    def wait_ready(self) -> None:
        """Block until every worker has built its handler (raises if one could not)."""
        workers = [self._idle.get() for _ in range(self.workers)]
        try:
            for w in workers:
                w.wait_ready()
        finally:
            for w in workers:
                self._idle.put(w)

    def call(self, payload):
        w = self._idle.get()
        self.busy += 1
        try:
            try:
                w.wait_ready()  # a fresh worker's start-up is not charged to the payload
            except Exception:
                w.kill()
                w = _Worker(self._ctx, self.factory, self.args)
                raise
            t0 = time.monotonic()
            try:
                w.conn.send(payload)
                answered = w.conn.poll(self.timeout)
                kind, value = w.conn.recv() if answered else (None, None)
            except (EOFError, OSError):
                code = w.process.exitcode
                w.kill()
                w = _Worker(self._ctx, self.factory, self.args)
                raise WorkerDied(f"worker died (exit code {code}) after {time.monotonic() - t0:.1f} s") from None
            if not answered:
                log.warning("worker call over its %.1f s budget: killing the worker", self.timeout)
                w.kill()
                w = _Worker(self._ctx, self.factory, self.args)
                raise TimeoutError(f"over the {self.timeout:g} s budget")
            if kind == "error":
                raise RuntimeError(f"worker call failed: {value}")
            return value
        finally:
            self.busy -= 1
            self._idle.put(w)

    async def acall(self, payload):
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.call, payload)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return
