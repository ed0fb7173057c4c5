"""Continuous batching: a fixed number of slots decode together; waiting requests take free slots.

One loop (a background thread after :meth:`Engine.start`, or the caller's thread inside
:meth:`Engine.generate`) repeats: drop cancelled requests, give free slots to waiting requests, run
one prefill call (the next chunk of the oldest request still prefilling, together with the next chunks
of other prefilling requests that fit the same bucket, within the ``prefill_chunk`` token budget),
run one decode step for every slot that is generating, then hand out the tokens of the previous
iteration. Prefill calls interleave with decode steps, so a new request never pauses the others for
more than one call of at most ``prefill_chunk`` tokens, and reading the
previous step's tokens while the next one runs keeps the device busy (a finished request costs one
discarded step). Requests never see each other: each slot has its own cache row, positions and
random stream.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
from typing import AsyncIterator, Iterator

import jax
import numpy as np

from gptoss_jax.decode.prefix_cache import PrefixCache, block_hashes
from gptoss_jax.decode.runner import (KV_BUCKET_MIN, Chunk, Runner, plan_chunks, prefill_rows, prefill_shapes,
                                      require_positive)
from gptoss_jax.decode.sampling import SamplingParams, SlotBias, SlotSampling
from gptoss_jax.model import GptOss

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
_ids = itertools.count(1)


class Request:
    """One generation. Iterate (``for tok in request``, blocking) or ``async for tok in request.aiter()``
    for token ids as they are generated; a completion that ends on a stop token ends with it.

    ``finish_reason`` is None while running, then "stop" | "length" | "cancelled" | "error" (with
    ``error`` set). ``prompt_tokens`` and ``completion_tokens`` count ids (usage). ``cancel()`` frees
    the slot. Thread-safe; any number of consumers may iterate.

    Submitted with ``logprobs``, ``logprobs[i]`` is token i's (logprob, top ids, top logprobs) (floats
    and lists of TOP_LOGPROBS, largest first), set before the token is handed out; with
    ``prompt_logprobs``, ``prompt_logprobs[i]`` is the same for prompt token i (None for the first), set
    before the first generated token.
    """

    def __init__(self, engine: "Engine", prompt: list[int], params: SamplingParams, limit: int,
                 logprobs: bool = False, prompt_logprobs: bool = False, constraint=None):
        self.id = next(_ids)
        self.constraint = constraint
        self.prompt = list(prompt)
        self.params = params
        self.prompt_tokens = len(prompt)
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.stop_token: int | None = None
        self._engine = engine
        self._limit = limit  # completion tokens allowed (max_tokens, and what the context leaves)
        self._key = params.key_data()
        self._tokens: list[int] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancel_requested = False
        self.logprobs: list | None = [] if logprobs else None
        self.prompt_logprobs: list | None = [None] if prompt_logprobs else None

    def __repr__(self):
        return (f"Request(id={self.id}, prompt_tokens={self.prompt_tokens}, completion_tokens={self.completion_tokens}, "
                f"finish_reason={self.finish_reason!r})")

    @property
    def completion_tokens(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The generated ids so far."""
        with self._cond:
            return list(self._tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating and free the slot (finish_reason "cancelled"); no-op once finished."""
        self._engine._cancel(self)

    def _wait(self, seen: int, timeout: float | None) -> tuple[list[int], bool]:
        with self._cond:
            self._cond.wait_for(lambda: len(self._tokens) > seen or self.done, timeout)
            return self._tokens[seen:], self.done

    def __iter__(self) -> Iterator[int]:
        seen = 0
        while True:
            new, done = self._wait(seen, None)
            yield from new
            seen += len(new)
            if done and not new:
                return

    async def aiter(self) -> AsyncIterator[int]:
        """The tokens as an async iterator (for asyncio servers); never blocks the event loop."""
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            with self._cond:
                new, done = self._tokens[seen:], self.done
                event = None
                if not new and not done:
                    event = asyncio.Event()
                    self._waiters.append((loop, event))
            for t in new:
                yield t
            seen += len(new)
            if done and not new:
                return
            if event is not None:
                await event.wait()

    __aiter__ = aiter

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until finished; the generated ids. Raises if the request failed or timed out."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if self.finish_reason == "error":
            raise RuntimeError(f"request {self.id} failed: {self.error!r}") from self.error
        return self.tokens

    async def aresult(self) -> list[int]:
        async for _ in self.aiter():
            pass
        return self.result()

    # ------------------------------------------------------------------ engine side
    def _emit(self, token: int) -> None:
        with self._cond:
            self._tokens.append(token)
            self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self.finish_reason, self.error = reason, error
            self._notify()

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, event in self._waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass
        self._waiters.clear()


@dataclasses.dataclass
class _Slot:
    """A request bound to a slot: prompt chunks still to run, tokens dispatched so far."""

    request: Request
    chunks: list[tuple[int, int, int]]
    dispatched: int = 0

    @property
    def generating(self) -> bool:
        return not self.chunks and self.dispatched < self.request._limit


class Engine:
    """Batched, streaming generation with a gpt-oss model.

    ``max_batch`` slots decode together; ``context`` bounds prompt + completion per request (it sizes
    the KV cache: see :func:`gptoss_jax.layers.kv_cache.cache_bytes`); prompts are prefilled in chunks
    of at most ``prefill_chunk`` tokens, and one prefill call runs at most ``prefill_chunk`` tokens
    (chunks of several prompts together when they are short). Use :meth:`start` / :meth:`stop` (or
    ``with Engine(...)``) for a background loop and :meth:`submit` from any thread, or :meth:`generate`
    alone.

    ``prefix_cache_blocks`` > 0 keeps that many prompt blocks of ``prefill_chunk`` tokens (their KV) for
    later requests sharing a prefix (:mod:`gptoss_jax.decode.prefix_cache`; counters in ``status()``).

    Each decode step reads the full-attention layers' cache up to the smallest length bucket holding
    the running sequences (powers of two from ``kv_bucket_min``, and ``context``:
    :func:`gptoss_jax.decode.runner.decode_buckets`), one decode program per bucket.
    """

    def __init__(self, model: GptOss, *, max_batch: int = 8, context: int = 4096, prefill_chunk: int = 256,
                 prefix_cache_blocks: int = 0, kv_bucket_min: int = KV_BUCKET_MIN):
        require_positive("Engine", max_batch=max_batch, context=context, prefill_chunk=prefill_chunk)
        cfg = model.config
        if context > cfg.max_position_embeddings:
            raise ValueError(f"Engine context {context} exceeds the model's {cfg.max_position_embeddings} positions")
        self.config = cfg
        self.max_batch, self.context, self.prefill_chunk = max_batch, context, prefill_chunk
        self.runner = Runner(model, max_batch=max_batch, context=context, prefill_chunk=prefill_chunk,
                             kv_bucket_min=kv_bucket_min)
        if not isinstance(prefix_cache_blocks, int) or prefix_cache_blocks < 0:
            raise ValueError(f"Engine prefix_cache_blocks must be an integer >= 0, got {prefix_cache_blocks!r}")
        self._prefix_blocks = prefix_cache_blocks if prefill_chunk < context else 0
        self.prefix = self._new_prefix_cache()
        self.stats: collections.Counter = collections.Counter()
        self._slots: list[_Slot | None] = [None] * max_batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._pending: list = []  # dispatched results not yet handed out
        self._cond = threading.Condition()
        self._drive = threading.Lock()  # one loop at a time
        self._thread: threading.Thread | None = None
        self._running = False

    def _new_prefix_cache(self) -> PrefixCache | None:
        if not self._prefix_blocks:
            return None
        return PrefixCache(self.runner, self._prefix_blocks, self.prefill_chunk)

    # ------------------------------------------------------------------ public API
    def submit(self, prompt: list[int], params: SamplingParams | None = None, *, logprobs: bool = False,
               prompt_logprobs: bool = False, constraint=None) -> Request:
        """Queue a request (thread-safe) and return it at once. ValueError for an empty prompt, ids
        outside the vocabulary, or a prompt that leaves no room in the context. ``logprobs`` /
        ``prompt_logprobs``: keep the generated / prompt tokens' log-probabilities (:class:`Request`).

        ``constraint``: constrained decoding, an object with ``fill(row)`` (write the packed int32 mask of
        the tokens allowed next into ``row`` [words]) and ``advance(token) -> bool`` (False: the token broke
        it; :class:`gptoss_jax.serving.constrain.Constraint` wraps llguidance). Such a request decodes one
        token per two loop rounds (its next mask needs its last token), the others are unaffected."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty: at least one token id is needed")
        if len(prompt) >= self.context:
            raise ValueError(f"prompt has {len(prompt)} tokens but the context holds {self.context} "
                             f"(prompt + completion): at most {self.context - 1} prompt tokens")
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad} is {prompt[bad]}, outside the vocabulary [0, {self.config.vocab_size})")
        bad = next((t for t, _ in params.logit_bias if t >= self.config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"logit_bias token {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        request = Request(self, prompt, params, min(params.max_tokens, self.context - len(prompt)), logprobs,
                          prompt_logprobs, constraint)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[int]]:
        """Generate for every prompt (batched) and return the completions; blocking. Runs the loop in
        this thread unless :meth:`start` did."""
        requests = [self.submit(p, params) for p in prompts]
        if not self._running:
            with self._drive:
                while not all(r.done for r in requests):
                    self._iterate()
        return [r.result() for r in requests]

    def start(self, warmup: bool = True) -> None:
        """Run the batching loop in a background thread (after compiling every shape when ``warmup``)."""
        if self._running:
            return
        if warmup:
            self.warmup()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="gptoss-decode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still waiting or running finish as "cancelled"."""
        if self._thread is not None:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            self._thread.join()
            self._thread = None
        with self._drive:
            self._flush()
            with self._cond:
                requests = list(self._waiting) + [s.request for s in self._slots if s is not None]
                self._waiting.clear()
            self._slots = [None] * self.max_batch
        for r in requests:
            r._finish("cancelled")

    def warmup(self) -> None:
        """Compile the decode step of every length bucket and every prefill shape now (on an idle engine)."""
        with self._drive:
            if any(self._slots):
                raise RuntimeError("warmup needs an idle engine")
            shapes = prefill_shapes(self.prefill_chunk, self.max_batch)
            log.info("compiling the decode step for %d length buckets %s and %d prefill shapes (chunks x tokens) %s",
                     len(self.runner.buckets), self.runner.buckets, len(shapes), shapes)
            off = SlotSampling.of(SamplingParams(temperature=0.0), np.zeros(2, np.uint32))
            for rows, bucket in shapes:  # the slots are free: the next prefill on each resets it
                self.runner.prefill([Chunk(i, [0], 0, off) for i in range(rows)], bucket)
            idle = np.zeros(self.max_batch, bool)
            for kv_len in self.runner.buckets:
                jax.block_until_ready(self.runner.decode(idle, kv_len=kv_len))
            if self.prefix is not None:  # both programs, on free slot 0 and free entry 0 (no entry refers to it)
                self.runner.state = self.prefix.restore(self.runner.state, 0, [])
                self.prefix.save(self.runner.state, 0, [b"warmup"], 0)
                self.prefix = self._new_prefix_cache()

    def status(self) -> dict:
        """Slots in use, requests waiting and the counters (``stats``), for /health; thread-safe."""
        with self._cond:
            active = sum(s is not None for s in self._slots)
            waiting = len(self._waiting)
        prefix = {} if self.prefix is None else {"prefix_cache": self.prefix.status()}
        return {"max_batch": self.max_batch, "active": active, "waiting": waiting, **dict(self.stats), **prefix}

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: not self._running or self._waiting or self._pending
                                    or any(self._slots), timeout=1.0)
                if not self._running:
                    return
            with self._drive:
                self._iterate()

    def _iterate(self) -> None:
        """One round: cancel, admit, one prefill chunk, one decode step, hand out earlier results."""
        try:
            self._admit()
            dispatched = self._dispatch()
            self._flush()
            self._pending = dispatched
            if not dispatched and not any(self._slots):
                with self._cond:  # nothing to run: wait briefly for a submission (inline generate)
                    self._cond.wait_for(lambda: self._waiting, timeout=0.01)
        except Exception as e:  # noqa: BLE001 - fail the affected requests, keep serving
            log.exception("decode step failed; failing %d running requests", sum(s is not None for s in self._slots))
            self._pending = []
            for i, s in enumerate(self._slots):
                if s is not None:
                    s.request._finish("error", e)
                    self._slots[i] = None
            self.runner.reset()
            if self.prefix is not None:  # a failed program may have consumed the donated pool
                self.prefix = self._new_prefix_cache()

    def _admit(self) -> None:
        with self._cond:
            for i, s in enumerate(self._slots):
                if s is not None and s.request.cancel_requested:
                    s.request._finish("cancelled")
                if s is not None and s.request.done:
                    self._slots[i] = None
            busy = any(s is not None and s.generating for s in self._slots)
            for i in range(self.max_batch):
                while self._slots[i] is None and self._waiting:
                    r = self._waiting.popleft()
                    if r.cancel_requested:
                        r._finish("cancelled")
                        continue
                    self._slots[i] = _Slot(r, self._plan(i, r))
                    self.stats["admitted"] += 1
                    self.stats["admitted_while_decoding"] += busy

    def _plan(self, slot: int, r: Request) -> list[tuple[int, int, int]]:
        """The prompt's chunks for ``slot``; with a prefix cache, the cached leading blocks are restored
        into the slot's rows first and the chunks start after them."""
        start = 0
        if self.prefix is not None:
            r._hashes = block_hashes(r.prompt, self.prefill_chunk)
            hit = self.prefix.lookup(r._hashes, r.prompt_tokens)
            if hit:
                self.runner.state = self.prefix.restore(self.runner.state, slot, hit)
                start = len(hit) * self.prefill_chunk
        return [(start + s, n, b) for s, n, b in plan_chunks(r.prompt_tokens - start, self.prefill_chunk)]

    def _dispatch(self) -> list:
        """Queue one prefill call and one decode step on the device; return what to read back later."""
        out = []
        prefilling = sorted((i for i, s in enumerate(self._slots) if s is not None and s.chunks),
                            key=lambda j: self._slots[j].request.id)
        if prefilling:  # the oldest request's next chunk, with others that fit its bucket
            bucket = self._slots[prefilling[0]].chunks[0][2]
            rows = prefill_rows(bucket, self.prefill_chunk, self.max_batch)
            picked = [i for i in prefilling if self._slots[i].chunks[0][2] <= bucket][:rows]
            chunks, spans = [], {}
            for row, i in enumerate(picked):
                s = self._slots[i]
                start, n, _ = s.chunks.pop(0)
                r = s.request
                chunks.append(Chunk(i, r.prompt[start:start + n], start, SlotSampling.of(r.params, r._key),
                                    SlotBias.of(r.params)))
                if r.prompt_logprobs is not None:
                    spans[row] = (r, start, n)
            targets = None
            if spans:  # the ids each position predicts: the next prompt token
                targets = [self._slots[i].request.prompt[c.start + 1:c.start + len(c.tokens) + 1]
                           for i, c in zip(picked, chunks)]
            allowed = None
            if any(not self._slots[c.slot].chunks and self._slots[c.slot].request.constraint for c in chunks):
                allowed = self.runner.no_mask(len(chunks))
                for row, c in enumerate(chunks):
                    r = self._slots[c.slot].request
                    if not self._slots[c.slot].chunks and r.constraint is not None:
                        r.constraint.fill(allowed[row])
            sampled, prompt = self.runner.prefill_sampled(chunks, bucket, targets, allowed)
            if self.prefix is not None:  # each full chunk is a block: into the pool before the rows change
                for c in chunks:
                    if len(c.tokens) == self.prefill_chunk:
                        self.prefix.save(self.runner.state, c.slot, self._slots[c.slot].request._hashes,
                                         c.start // self.prefill_chunk)
            self.stats["prefill_calls"] += 1
            self.stats["prefill_chunks"] += len(chunks)
            owners = {}
            for row, i in enumerate(picked):
                if not self._slots[i].chunks:  # the prompt is in: its first token comes out of this call
                    self._slots[i].dispatched = 1
                    owners[row] = self._slots[i].request
            if spans:
                out.append((prompt, spans))
            if owners:
                out.append((sampled, owners))
        active = np.array([s is not None and s.generating and s.dispatched > 0
                           and (s.request.constraint is None or s.request.completion_tokens == s.dispatched)
                           for s in self._slots])  # a constrained row waits for its last token
        if active.any():
            allowed = None
            for i in np.flatnonzero(active):
                if (c := self._slots[i].request.constraint) is not None:
                    allowed = self.runner.no_mask(self.max_batch) if allowed is None else allowed
                    c.fill(allowed[i])
            tokens, *_ = self.runner.decode_sampled(active, allowed)
            self.stats["decode_steps"] += 1
            owners = {}
            for i in np.flatnonzero(active):
                self._slots[i].dispatched += 1
                owners[int(i)] = self._slots[i].request
            out.append((tokens, owners))
        return out

    def _flush(self) -> None:
        """Hand out the tokens of earlier dispatches; finish requests on a stop token or their limit."""
        pending, self._pending = self._pending, []
        for out, owners in pending:
            if not hasattr(out, "tokens"):  # prompt logprobs of the chunks on these rows
                lp = jax.tree.map(np.asarray, out)
                for row, (r, start, n) in owners.items():
                    r.prompt_logprobs.extend(_logprob_rows(lp, row, n if start + n < r.prompt_tokens else n - 1))
                continue
            values = np.asarray(out.tokens)
            lp = None
            if any(r.logprobs is not None for r in owners.values()):
                lp = jax.tree.map(np.asarray, out.logprobs)
            for i, r in owners.items():  # i: the row of ``tokens`` (the slot, for a decode step)
                if r.done:  # finished or cancelled since: a discarded step
                    continue
                token = int(values[i])
                if r.logprobs is not None:
                    r.logprobs.append(_logprob_row(lp, i))
                r._emit(token)
                self.stats["tokens"] += 1
                if r.constraint is not None and not r.constraint.advance(token):
                    r._finish("error", RuntimeError(f"token {token} does not satisfy the request's constraint"))
                elif token in r.params.stop_token_ids:
                    r.stop_token = token
                    r._finish("stop")
                elif r.completion_tokens >= r._limit:
                    r._finish("length")

    def _cancel(self, request: Request) -> None:
        with self._cond:
            request.cancel_requested = True
            if request in self._waiting:
                self._waiting.remove(request)
                request._finish("cancelled")
            self._cond.notify_all()


def _logprob_row(lp, i: int, j: int | None = None) -> tuple[float, list[int], list[float]]:
    """(logprob, top ids, top logprobs) of row ``i`` (position ``j``) of host Logprobs arrays."""
    at = (i,) if j is None else (i, j)
    return float(lp.chosen[at]), lp.top_ids[at].tolist(), lp.top_values[at].tolist()


def _logprob_rows(lp, row: int, n: int) -> list:
    return [_logprob_row(lp, row, j) for j in range(n)]
