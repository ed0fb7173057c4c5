"""The device side of decoding: a fixed number of slots sharing one KV cache, a jitted prefill chunk
and a jitted decode step.

Each function is compiled once per shape: the decode step once per length bucket ([max_batch] slots,
:func:`decode_buckets`), the prefill once per :func:`prefill_shapes` entry. A prompt is cut into chunks of ``prefill_chunk`` tokens and one tail
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
  carry position -1, which writes nothing and attends to nothing. Full-attention layers attend over
  the first ``kv_len`` slots of their cache only, ``kv_len`` the smallest length bucket (powers of two
  from ``kv_bucket_min``, and the context) holding every active slot's next position: a step reads
  the keys of the sequences' length (at most twice it, at least ``kv_bucket_min``), not of the
  context. The runner knows each slot's length on the host (prefill sets it, decode counts it), so
  picking the bucket reads nothing back from the device; each bucket's program is compiled on first
  use (logged), at most ``len(decode_buckets(context, kv_bucket_min))`` of them. Sliding-window
  layers keep their ring of ``window`` slots whatever the bucket.

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
from gptoss_jax.config import KV_BUCKET_MIN
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


def require_positive(what: str, **values) -> None:
    """Raise ``ValueError("<what> <name> must be a positive integer, got <value>")`` for the first of
    ``values`` that is not an int >= 1 (bools refused)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{what} {name} must be a positive integer, got {value!r}")


def decode_buckets(context: int, smallest: int = KV_BUCKET_MIN) -> tuple[int, ...]:
    """Lengths (cache slots read by full-attention layers) decode steps are compiled for: powers of two
    from ``smallest`` below ``context``, and ``context`` (only it when ``smallest >= context``)."""
    require_positive("decode buckets:", context=context, smallest=smallest)
    sizes, n = [], 1 << (smallest - 1).bit_length()  # smallest rounded up to a power of two
    while n < context:
        sizes.append(n)
        n *= 2
    return (*sizes, context)


def decode_bucket(needed: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` (ascending) holding ``needed`` slots; the largest when none does."""
    return next((b for b in buckets if b >= needed), buckets[-1])


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
    ``kv_bucket_min``: the smallest decode length bucket (:func:`decode_buckets`; ``context`` or more:
    every step reads the whole cache). ``lengths`` [B] (host): positions each slot holds, kept by
    :meth:`prefill` and :meth:`decode`; ``state`` must change only through them (and the prefix
    cache's restore, which a prefill of the slot follows), or the bucket may be too short.
    """

    def __init__(self, model: GptOss, *, max_batch: int, context: int, prefill_chunk: int,
                 return_logits: bool = False, kv_bucket_min: int = KV_BUCKET_MIN):
        self.config = model.config
        self.dtype = model.dtype
        self.layout = model.layout
        self.max_batch, self.context, self.prefill_chunk = max_batch, context, prefill_chunk
        self.buckets = decode_buckets(context, kv_bucket_min)
        self.compiled_buckets: set[int] = set()  # decode buckets run so far (compiled on first use)
        self.graphdef, self.params = nnx.split(model)
        self.platform = platform.of(self.params)
        self.return_logits = return_logits
        self.reset()

    def reset(self) -> None:
        """Fresh state (after a failed step, whose donated inputs may be gone)."""
        self.state = empty_state(self.config, self.max_batch, self.context, self.dtype, self.layout)
        self.lengths = np.zeros(self.max_batch, np.int64)

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
        for c in chunks:
            self.lengths[c.slot] = c.start + len(c.tokens)
        return sampled, prompt

    def decode(self, active: np.ndarray, allowed: np.ndarray | None = None, kv_len: int | None = None):
        """One token for every slot where ``active`` [B] bool; returns device int32 [B] (and logits).
        ``allowed``: packed allowed-token masks [B, words] (None = any token). ``kv_len``: the length
        bucket to run (one of ``buckets``; None: :meth:`bucket`)."""
        sampled, *logits = self.decode_sampled(active, allowed, kv_len)
        return sampled.tokens if not logits else (sampled.tokens, *logits)

    def bucket(self, active: np.ndarray) -> int:
        """The decode step's length bucket: the smallest holding every active slot's positions and the
        one it adds (the smallest bucket when none is active)."""
        active = np.asarray(active, bool)
        needed = int(self.lengths[active].max()) + 1 if active.any() else 1
        return decode_bucket(needed, self.buckets)

    def decode_sampled(self, active: np.ndarray, allowed: np.ndarray | None = None, kv_len: int | None = None):
        """:meth:`decode` returning (:class:`Sampled`, and the logits with ``return_logits``)."""
        active = np.asarray(active, bool)
        if active.shape != (self.max_batch,):
            raise ValueError(f"active must be bool [{self.max_batch}], got shape {active.shape}")
        fits = self.bucket(active)
        kv_len = fits if kv_len is None else kv_len
        if kv_len not in self.buckets:
            raise ValueError(f"kv_len {kv_len} is not a decode bucket {self.buckets}")
        if kv_len < fits:
            raise ValueError(f"kv_len {kv_len} is shorter than the active slots' {fits}")
        if kv_len not in self.compiled_buckets:
            log.info("decode: length bucket %d of %s (compiled on first use)", kv_len, self.buckets)
            self.compiled_buckets.add(kv_len)
        _, decode = jitted(self.platform)
        mask = self.no_mask(self.max_batch) if allowed is None else allowed
        self.state, *out = decode(self.platform, self.graphdef, self.return_logits, kv_len, self.params, self.state,
                                  active, mask)
        self.lengths += active
        return tuple(out)


@functools.cache
def jitted(target: str):
    """(prefill, decode) for programs compiled for ``target`` (the platform the parameters live on),
    jitted once per process and platform. Both take the platform first, then the graph definition:
    static arguments, so runners of the same model and shapes share executables and each platform
    gets its own trace (:func:`gptoss_jax.platform.current` is set while tracing). Each donates the
    state. The decode step also takes ``return_logits`` and its length bucket ``kv_len`` (static)."""
    opts = compiler_options(target)
    return (jax.jit(_prefill, static_argnums=(0, 1, 2), donate_argnums=4, compiler_options=opts),
            jax.jit(_decode, static_argnums=(0, 1, 2, 3), donate_argnums=5, compiler_options=opts))


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


def _decode(target: str, graphdef, return_logits: bool, kv_len: int, params, state: DecodeState, active,
            allowed=None):
    """active [B] bool; every active slot's position must be below ``kv_len`` (the slots full-attention
    layers read)."""
    with platform.lowering_for(target):
        return _decode_traced(graphdef, return_logits, kv_len, params, state, active, allowed)


def _decode_traced(graphdef, return_logits: bool, kv_len: int, params, state: DecodeState, active, allowed=None):
    model = nnx.merge(graphdef, params)
    s = state.slots
    positions = jnp.where(active, s.positions, -1)
    h, cache = model.hidden_states(s.tokens[:, None], positions[:, None], state.cache, kv_len=kv_len)
    logits = model.unembed(h[:, 0])  # [B, V]
    tokens = sample(logits, s.sampling, s.counts, s.bias.dense(s.seen), allowed)
    slots = s._replace(tokens=jnp.where(active, tokens, s.tokens), positions=jnp.where(active, s.positions + 1, s.positions),
                       counts=s.counts + active.astype(jnp.int32),
                       seen=s.seen.at[jnp.arange(tokens.shape[0]), tokens].add(active.astype(jnp.int32)))
    out = (DecodeState(cache, slots), Sampled(tokens, logprobs(logits, tokens)))
    return out + (logits,) if return_logits else out
