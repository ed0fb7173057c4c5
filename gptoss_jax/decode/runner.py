"""The device side of decoding: a fixed number of slots sharing one KV cache, a jitted prefill chunk
and a jitted decode step.

Each function is compiled once per shape: the decode step once ([max_batch] slots), the prefill once
per :func:`prefill_shapes` entry. A prompt is cut into chunks of ``prefill_chunk`` tokens and one tail
padded to a bucket (powers of two from 16 up to ``prefill_chunk``). ``prefill_chunk`` is also the
token budget of one prefill call: chunks of several requests in the same bucket run together, up to
``prefill_chunk // bucket`` of them (at most ``max_batch``), so short prompts arriving together share
one pass over the weights. Both functions donate the state (cache + per-slot arrays), so XLA updates it
in place.

- ``prefill(chunks, bucket)`` runs one chunk of each of up to that many requests (each on its own slot)
  through the model on those slots' cache rows only (the other slots are untouched), samples each
  request's first token from its chunk's last position and arms the slots (next token, position,
  sampling parameters).
- ``decode(active)`` advances every active slot by one token ([B, 1] through the model); idle slots
  carry position -1, which writes nothing and attends to nothing.

Every call also returns the sampled tokens' log-probabilities and the TOP_LOGPROBS alternatives
(:class:`~gptoss_jax.decode.sampling.Logprobs`, computed for every row: no request compiles anything).
Each slot counts the tokens it generated (``seen`` [B, V]) for the presence/frequency penalties, which
with its ``logit_bias`` make the additive bias of its row. A prefill with ``prompt_targets`` (a second
program per shape, compiled on first use) also returns the log-probabilities of each prompt token
(``echo``).
"""
from __future__ import annotations

import functools
import logging
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax import platform
from gptoss_jax.decode.sampling import Logprobs, SamplingParams, SlotBias, SlotSampling, logprobs, mask_words, sample
from gptoss_jax.layers.kv_cache import LayerCache, init_cache
from gptoss_jax.model import GptOss

log = logging.getLogger(__name__)

#: Smallest prefill chunk bucket.
MIN_BUCKET = 16


class Slots(NamedTuple):
    """Per-slot state [B]: the next input token, its position, tokens sampled so far (the request's
    RNG stream index), the sampling parameters, the bias parameters and how often each token was
    generated (int32 [B, V])."""

    tokens: jax.Array
    positions: jax.Array
    counts: jax.Array
    sampling: SlotSampling
    bias: SlotBias
    seen: jax.Array


class Sampled(NamedTuple):
    """What a call returns per row: tokens int32 [R] and their :class:`Logprobs`."""

    tokens: jax.Array
    logprobs: Logprobs


class DecodeState(NamedTuple):
    cache: list[LayerCache]
    slots: Slots


def prefill_buckets(prefill_chunk: int) -> tuple[int, ...]:
    """Chunk lengths compiled for prefill: powers of two from 16 below ``prefill_chunk``, and it."""
    sizes = {prefill_chunk}
    n = MIN_BUCKET
    while n < prefill_chunk:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes))


def prefill_rows(bucket: int, prefill_chunk: int, max_batch: int) -> int:
    """Chunks one prefill call takes in ``bucket``: as many as the ``prefill_chunk`` token budget holds,
    at most ``max_batch``."""
    return max(1, min(max_batch, prefill_chunk // bucket))


def prefill_shapes(prefill_chunk: int, max_batch: int) -> tuple[tuple[int, int], ...]:
    """(rows, bucket) of every prefill program: one chunk alone, or a full row budget, per bucket."""
    return tuple((rows, b) for b in prefill_buckets(prefill_chunk)
                 for rows in sorted({1, prefill_rows(b, prefill_chunk, max_batch)}))


def plan_chunks(length: int, prefill_chunk: int) -> list[tuple[int, int, int]]:
    """A prompt of ``length`` tokens -> [(start, n_tokens, bucket)]: full chunks, then the tail padded
    to the smallest bucket that holds it."""
    buckets = prefill_buckets(prefill_chunk)
    out = []
    for start in range(0, length, prefill_chunk):
        n = min(prefill_chunk, length - start)
        out.append((start, n, next(b for b in buckets if b >= n)))
    return out


def empty_state(cfg, max_batch: int, context: int, dtype, layout=None) -> DecodeState:
    """Idle slots and empty caches (``jax.eval_shape`` it for abstract lowering); with a model's
    ``layout`` (on a mesh) the caches are created in their shards."""
    b = max_batch
    slots = Slots(jnp.zeros(b, jnp.int32), jnp.full(b, -1, jnp.int32), jnp.zeros(b, jnp.int32), SlotSampling.empty(b),
                  SlotBias.empty(b), jnp.zeros((b, cfg.vocab_size), jnp.int32))
    cache = init_cache(cfg, b, context, dtype) if layout is None else layout.init_cache(cfg, b, context, dtype)
    return DecodeState(cache, slots)


@functools.cache
def compiler_options(target: str) -> dict[str, str] | None:
    """For programs compiled for ``target`` (a :mod:`gptoss_jax.platform` name).

    XLA:CPU only: keep YNNPACK fusions for dots (bf16 matmuls stay bf16) but not for reductions,
    which otherwise pull the packed-MXFP4 matrix-vector products apart and unpack the experts into
    memory (17x the bytes, 10x slower). None elsewhere, or where this XLA lacks the option."""
    if target != "cpu":
        return None
    opts = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
    try:
        jax.jit(lambda x: x + 1, compiler_options=opts).lower(jnp.zeros(2, device=jax.devices("cpu")[0])).compile()
    except Exception as e:  # noqa: BLE001 - an XLA without the option: default fusions
        log.warning("XLA:CPU option %s unavailable (%s); decode uses default fusions", opts, e)
        return None
    return opts


class Chunk(NamedTuple):
    """Prompt ``tokens`` of the request on ``slot`` at positions ``start``..; ``start == 0`` clears the slot.
    ``bias``: the request's logit bias and penalties (None: none)."""

    slot: int
    tokens: Sequence[int]
    start: int
    sampling: SlotSampling
    bias: SlotBias | None = None


_NEUTRAL = SamplingParams()


class Runner:
    """Jitted prefill and decode for ``max_batch`` slots with ``context`` positions each.

    ``return_logits`` makes :meth:`decode` also return the float32 logits [B, V] (tests, analysis).
    """

    def __init__(self, model: GptOss, *, max_batch: int, context: int, prefill_chunk: int,
                 return_logits: bool = False):
        self.config = model.config
        self.dtype = model.dtype
        self.layout = model.layout
        self.max_batch, self.context, self.prefill_chunk = max_batch, context, prefill_chunk
        self.graphdef, self.params = nnx.split(model)
        self.platform = platform.of(self.params)
        self.return_logits = return_logits
        self.reset()

    def reset(self) -> None:
        """Fresh state (after a failed step, whose donated inputs may be gone)."""
        self.state = empty_state(self.config, self.max_batch, self.context, self.dtype, self.layout)

    def no_mask(self, rows: int) -> np.ndarray:
        """An allowed-token mask letting every token through: int32 [rows, mask_words(V)] all bits set."""
        return np.full((rows, mask_words(self.config.vocab_size)), -1, np.int32)

    def prefill(self, chunks: Sequence[Chunk], bucket: int, allowed: np.ndarray | None = None) -> jax.Array:
        """Run ``chunks`` (distinct slots, each at most ``bucket`` ids) in one call; returns the token
        sampled after each chunk (device int32 [rows], the first ``len(chunks)`` are theirs); ``allowed``:
        packed masks of the chunks' first tokens ([len(chunks), words], see :func:`sample`; None = any)."""
        return self.prefill_sampled(chunks, bucket, allowed=allowed)[0].tokens

    def prefill_sampled(self, chunks: Sequence[Chunk], bucket: int,
                        prompt_targets: Sequence[Sequence[int]] | None = None,
                        allowed: np.ndarray | None = None) -> tuple[Sampled, Logprobs | None]:
        """:meth:`prefill` with the tokens' :class:`Logprobs`; with ``prompt_targets`` (per chunk, the ids
        that follow each of its positions) also the Logprobs of those targets, [rows, bucket]."""
        rows = 1 if len(chunks) == 1 else prefill_rows(bucket, self.prefill_chunk, self.max_batch)
        if not 1 <= len(chunks) <= rows or len({c.slot for c in chunks}) < len(chunks):
            raise ValueError(f"prefill takes 1 to {rows} chunks of distinct slots in bucket {bucket}, "
                             f"got slots {[c.slot for c in chunks]}")
        slots = np.full(rows, self.max_batch, np.int32)  # padding rows: a slot past the end, never written
        ids = np.zeros((rows, bucket), np.int32)
        pos = np.full((rows, bucket), -1, np.int32)
        last = np.zeros(rows, np.int32)
        for r, c in enumerate(chunks):
            n = len(c.tokens)
            slots[r], ids[r, :n], last[r] = c.slot, c.tokens, n - 1
            pos[r, :n] = np.arange(c.start, c.start + n, dtype=np.int32)
        samplings = [c.sampling for c in chunks] + [chunks[0].sampling] * (rows - len(chunks))
        sampling = jax.tree.map(lambda *xs: np.stack(xs), *samplings)
        neutral = SlotBias.of(_NEUTRAL)
        biases = [neutral if c.bias is None else c.bias for c in chunks] + [neutral] * (rows - len(chunks))
        bias = jax.tree.map(lambda *xs: np.stack(xs), *biases)
        targets = None
        if prompt_targets is not None:
            targets = np.zeros((rows, bucket), np.int32)
            for r, t in enumerate(prompt_targets):
                targets[r, :len(t)] = t
        mask = self.no_mask(rows)
        if allowed is not None:
            mask[:len(chunks)] = allowed
        prefill, _ = jitted(self.platform)
        self.state, sampled, prompt = prefill(self.platform, self.graphdef, targets is not None, self.params, self.state,
                                              slots, ids, pos, last, sampling, bias, targets, mask)
        return sampled, prompt

    def decode(self, active: np.ndarray, allowed: np.ndarray | None = None):
        """One token for every slot where ``active`` [B] bool; returns device int32 [B] (and logits).
        ``allowed``: packed allowed-token masks [B, words] (None = any token)."""
        sampled, *logits = self.decode_sampled(active, allowed)
        return sampled.tokens if not logits else (sampled.tokens, *logits)

    def decode_sampled(self, active: np.ndarray, allowed: np.ndarray | None = None):
        """:meth:`decode` returning (:class:`Sampled`, and the logits with ``return_logits``)."""
        _, decode = jitted(self.platform)
        mask = self.no_mask(self.max_batch) if allowed is None else allowed
        self.state, *out = decode(self.platform, self.graphdef, self.return_logits, self.params, self.state,
                                  np.asarray(active, bool), mask)
        return tuple(out)


@functools.cache
def jitted(target: str):
    """(prefill, decode) for programs compiled for ``target`` (the platform the parameters live on),
    jitted once per process and platform. Both take the platform first, then the graph definition:
    static arguments, so runners of the same model and shapes share executables and each platform
    gets its own trace (:func:`gptoss_jax.platform.current` is set while tracing). Each donates the
    state."""
    opts = compiler_options(target)
    return (jax.jit(_prefill, static_argnums=(0, 1, 2), donate_argnums=4, compiler_options=opts),
            jax.jit(_decode, static_argnums=(0, 1, 2), donate_argnums=4, compiler_options=opts))


def _prefill(target: str, graphdef, with_prompt: bool, params, state: DecodeState, slots, tokens, positions, last,
             sampling: SlotSampling, bias: SlotBias, targets, allowed=None):
    """slots [R] (padding rows: max_batch), tokens and positions [R, T], last [R]: one chunk per row;
    targets [R, T] (with_prompt) the ids whose log-probabilities each position's logits give;
    allowed [R, words] packed token masks."""
    with platform.lowering_for(target):
        state, sampled, h = _prefill_traced(graphdef, params, state, slots, tokens, positions, last, sampling, bias,
                                            allowed)
        prompt = logprobs(nnx.merge(graphdef, params).unembed(h), targets) if with_prompt else None
        return state, sampled, prompt


def _prefill_traced(graphdef, params, state: DecodeState, slots, tokens, positions, last, sampling: SlotSampling,
                    bias: SlotBias, allowed=None):
    model = nnx.merge(graphdef, params)
    fresh = positions[:, 0] == 0

    def rows(c: LayerCache) -> LayerCache:
        k, v, pos = (jnp.take(a, slots, axis=0, mode="clip") for a in c)
        return LayerCache(k, v, jnp.where(fresh[:, None], -1, pos))

    h, cache_rows = model.hidden_states(tokens, positions, [rows(c) for c in state.cache])
    logits = model.unembed(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])  # [R, V]
    none_seen = jnp.zeros(logits.shape, jnp.int32)
    new = sample(logits, sampling, jnp.zeros(slots.shape, jnp.int32), bias.dense(none_seen), allowed)
    put = lambda a, x: a.at[slots].set(x, mode="drop")  # noqa: E731 - padding rows are dropped
    cache = [LayerCache(*map(put, c, rc)) for c, rc in zip(state.cache, cache_rows)]
    s = state.slots
    next_pos = jnp.take_along_axis(positions, last[:, None], axis=1)[:, 0] + 1
    seen = none_seen.at[jnp.arange(new.shape[0]), new].set(1)
    armed = Slots(put(s.tokens, new), put(s.positions, next_pos), put(s.counts, jnp.ones_like(slots)),
                  jax.tree.map(put, s.sampling, sampling), jax.tree.map(put, s.bias, bias), put(s.seen, seen))
    return DecodeState(cache, armed), Sampled(new, logprobs(logits, new)), h


def _decode(target: str, graphdef, return_logits: bool, params, state: DecodeState, active, allowed=None):
    with platform.lowering_for(target):
        return _decode_traced(graphdef, return_logits, params, state, active, allowed)


def _decode_traced(graphdef, return_logits: bool, params, state: DecodeState, active, allowed=None):
    model = nnx.merge(graphdef, params)
    s = state.slots
    positions = jnp.where(active, s.positions, -1)
    h, cache = model.hidden_states(s.tokens[:, None], positions[:, None], state.cache)
    logits = model.unembed(h[:, 0])  # [B, V]
    tokens = sample(logits, s.sampling, s.counts, s.bias.dense(s.seen), allowed)
    slots = s._replace(tokens=jnp.where(active, tokens, s.tokens), positions=jnp.where(active, s.positions + 1, s.positions),
                       counts=s.counts + active.astype(jnp.int32),
                       seen=s.seen.at[jnp.arange(tokens.shape[0]), tokens].add(active.astype(jnp.int32)))
    out = (DecodeState(cache, slots), Sampled(tokens, logprobs(logits, tokens)))
    return out + (logits,) if return_logits else out
