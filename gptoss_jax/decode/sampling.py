"""Sampling parameters and the on-device sampler: greedy, temperature, top-k, top-p, per-request seeds.

Order (as transformers' warpers): logits / temperature -> top-k -> top-p -> draw. ``temperature == 0``
is greedy (argmax of the raw logits). Top-k keeps logits >= the k-th largest; top-p keeps the smallest
set of most likely tokens whose probability reaches ``top_p`` (after top-k); ties at either boundary
are kept. Both thresholds are found exactly, without sorting the vocabulary: a 32-step bisection over
the bit patterns of the values (each step one pass over [B, V]).

Token ``n`` of a request is drawn with ``fold_in(key(seed), n)``, so a seeded request gives the same
tokens whichever slot it runs in and whatever runs beside it.
"""
from __future__ import annotations

import dataclasses
import secrets
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: <|return|> and <|call|>: the harmony tokens that end an assistant turn.
STOP_TOKENS = (200002, 200012)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature`` 0 = greedy; ``top_k`` 0 and ``top_p`` 1 = off;
    ``seed`` None = a fresh random seed; generation stops after a token in ``stop_token_ids``
    (included in the output) or after ``max_tokens`` tokens."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = STOP_TOKENS

    def __post_init__(self):
        def bad(field, msg):
            raise ValueError(f"SamplingParams.{field} {msg}, got {getattr(self, field)!r}")

        if not _is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            bad("temperature", "must be a finite number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be None or an integer in [0, 2**63)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        try:
            stop = tuple(self.stop_token_ids)
        except TypeError:
            bad("stop_token_ids", "must be a sequence of token ids")
        if not all(_is_int(t) and t >= 0 for t in stop):
            bad("stop_token_ids", "must hold non-negative integer token ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop))

    def key_data(self) -> np.ndarray:
        """The request's threefry key as uint32 [2] (a random one when ``seed`` is None)."""
        seed = secrets.randbits(63) if self.seed is None else self.seed
        return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


class SlotSampling(NamedTuple):
    """Per-slot sampling parameters on device: temperature, top_p float32 [B]; top_k int32 [B];
    key uint32 [B, 2]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    key: jax.Array

    @staticmethod
    def of(params: SamplingParams, key: np.ndarray) -> "SlotSampling":
        """One request's row (numpy scalars; the key from :meth:`SamplingParams.key_data`)."""
        return SlotSampling(np.float32(params.temperature), np.int32(params.top_k), np.float32(params.top_p),
                            np.asarray(key, np.uint32))

    @staticmethod
    def empty(batch: int) -> "SlotSampling":
        return SlotSampling(jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.int32), jnp.ones(batch, jnp.float32),
                            jnp.zeros((batch, 2), jnp.uint32))


def mask_words(vocab: int) -> int:
    """int32 words of a packed allowed-token mask over ``vocab`` ids (bit ``v % 32`` of word ``v // 32``)."""
    return (vocab + 31) // 32


def unpack_mask(allowed: jax.Array, vocab: int) -> jax.Array:
    """Packed int32 [B, mask_words(V)] (llguidance's bitmask layout) -> bool [B, V]."""
    bits = jnp.right_shift(allowed[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(allowed.shape[0], -1)[:, :vocab].astype(bool)


def sample(logits: jax.Array, params: SlotSampling, counts: jax.Array, allowed: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, V] -> int32 tokens [B]; row b draws with ``fold_in(key[b], counts[b])``.
    ``allowed``: packed int32 [B, mask_words(V)] (all bits set = unconstrained): tokens outside it get -inf
    first (constrained decoding), for greedy and sampled rows alike."""
    if allowed is not None:
        logits = jnp.where(unpack_mask(allowed, logits.shape[-1]), logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        hot = params.temperature > 0
        scaled = logits / jnp.where(hot, params.temperature, 1.0)[:, None]
        filtered = jnp.any(hot & ((params.top_k > 0) | (params.top_p < 1)))
        scaled = jax.lax.cond(filtered, lambda s: filter_logits(s, params.top_k, params.top_p), lambda s: s, scaled)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(params.key), counts)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(hot, drawn, greedy)

    return jax.lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy, None)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set to -inf every logit outside the top-k (``top_k`` [B], 0 = off), then outside the top-p
    nucleus of what is left (``top_p`` [B], 1 = off). logits float32 [B, V]."""
    v = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    keys = _sortable(logits)
    kth = _largest_threshold(keys, lambda keep: jnp.sum(keep, axis=-1) >= k)
    logits = jnp.where(keys >= kth[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    pkeys = _sortable(probs)
    cut = _largest_threshold(pkeys, lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= top_p)
    cut = jnp.where(top_p < 1, cut, 0)
    return jnp.where(pkeys >= cut[:, None], logits, -jnp.inf)


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative values bit-flipped, positive ones offset)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, ok) -> jax.Array:
    """Per row, the largest uint32 ``t`` with ``ok(keys >= t)`` ([B, V] bool -> [B] bool, true at
    t = 0 and monotone), built from the top bit down: 32 passes over ``keys`` [B, V]."""
    def step(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(ok(keys >= cand[:, None]), cand, t)

    return jax.lax.fori_loop(0, 32, step, jnp.zeros(keys.shape[:1], jnp.uint32))
