"""Output-stream pieces every endpoint shares: cutting text at stop strings, interleaving the async
iterators of a request's choices, ending an answer at shutdown."""
from __future__ import annotations

import asyncio


class Endable:
    """An answer (with an engine ``request``) the server's shutdown can end: :meth:`end` cancels it and
    marks it ``cut``, so its finish_reason is "length" and what was generated so far is returned."""

    cut = False

    def end(self) -> None:
        self.cut = True
        self.request.cancel()


class StopStrings:
    """Cuts content at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        text, self.held = self.held + text, ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text, self.held = (text[:-keep], text[-keep:]) if keep else (text, "")
        return text

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.hit else held


async def merge(iterators):
    """Interleave async iterators of (index, item) as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
