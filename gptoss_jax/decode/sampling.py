"""Sampling parameters and the on-device sampler: greedy, temperature, top-k, top-p, per-request seeds,
logit bias and presence/frequency penalties, and the logprobs reported to clients.

Order (as transformers' warpers): logits + bias -> / temperature -> top-k -> top-p -> draw.
``temperature == 0`` is greedy (argmax of the biased logits). Top-k keeps logits >= the k-th largest;
top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (after top-k);
ties at either boundary are kept. Neither sorts the vocabulary: ``lax.top_k`` with a static cap
(:data:`TOP_K_CAP`) gives the k-th value and the nucleus whenever they lie among the CAP largest (top_k
<= CAP, or a nucleus of at most CAP tokens); rows where they do not fall back to an exact radix search
over the bit patterns of the values (8 steps of 4-bit digits per threshold, each one pass over [B, V]). Both give the same
kept set, so the same token for the same key.

The bias (``logit_bias`` and the penalties, :class:`SlotBias`) is a per-slot step input, like every
other parameter here: no request compiles anything.

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
#: the sampler's static top-k width: top_k <= this (and nuclei of at most this many tokens) never
#: take the bisection path
TOP_K_CAP = 64
#: alternatives reported per token (OpenAI's top_logprobs maximum); computed for every row every step
TOP_LOGPROBS = 20
#: logit_bias entries per request (OpenAI's limit)
MAX_LOGIT_BIAS = 300


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
    #: added to the generated tokens' logits: ``presence`` once a token appeared, ``frequency`` per time
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: (token id, bias) pairs added to the logits, at most MAX_LOGIT_BIAS
    logit_bias: tuple[tuple[int, float], ...] = ()

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
        for field in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, field)) or not -2 <= getattr(self, field) <= 2:
                bad(field, "must be a number in [-2, 2]")
        try:
            pairs = tuple((t, b) for t, b in (self.logit_bias.items() if isinstance(self.logit_bias, dict)
                                               else self.logit_bias))
        except (TypeError, ValueError):
            bad("logit_bias", "must be (token id, bias) pairs")
        if len(pairs) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"has more than {MAX_LOGIT_BIAS} entries")
        if not all(_is_int(t) and t >= 0 and _is_number(b) and -100 <= b <= 100 for t, b in pairs):
            bad("logit_bias", "must map token ids >= 0 to biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in pairs))

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


class SlotBias(NamedTuple):
    """Per-slot logit bias and penalties on device: presence, frequency float32 [B]; logit_bias as
    token ids int32 [B, MAX_LOGIT_BIAS] and values float32 [B, MAX_LOGIT_BIAS] (padding: id 0, 0.0)."""

    presence: jax.Array
    frequency: jax.Array
    ids: jax.Array
    values: jax.Array

    @staticmethod
    def of(params: SamplingParams) -> "SlotBias":
        ids = np.zeros(MAX_LOGIT_BIAS, np.int32)
        values = np.zeros(MAX_LOGIT_BIAS, np.float32)
        for i, (t, b) in enumerate(params.logit_bias):
            ids[i], values[i] = t, b
        return SlotBias(np.float32(params.presence_penalty), np.float32(params.frequency_penalty), ids, values)

    @staticmethod
    def empty(batch: int) -> "SlotBias":
        return SlotBias(jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.float32),
                        jnp.zeros((batch, MAX_LOGIT_BIAS), jnp.int32), jnp.zeros((batch, MAX_LOGIT_BIAS), jnp.float32))

    def dense(self, seen: jax.Array) -> jax.Array:
        """The additive bias float32 [B, V] given ``seen`` int32 [B, V], the times each token was generated
        (OpenAI's formula: ``logit_bias - presence * (seen > 0) - frequency * seen``)."""
        rows = jnp.arange(seen.shape[0])[:, None]
        bias = jnp.zeros(seen.shape, jnp.float32).at[rows, jnp.clip(self.ids, 0, seen.shape[1] - 1)].add(self.values)
        return bias - self.presence[:, None] * (seen > 0) - self.frequency[:, None] * seen.astype(jnp.float32)


class Logprobs(NamedTuple):
    """Log-probabilities under the model (log-softmax of the raw logits, before bias and filters):
    of the chosen tokens float32 [...], and the TOP_LOGPROBS most likely ids int32 / values float32 [..., K]."""

    chosen: jax.Array
    top_ids: jax.Array
    top_values: jax.Array


def logprobs(logits: jax.Array, tokens: jax.Array, k: int = TOP_LOGPROBS) -> Logprobs:
    """float32 logits [..., V] and int32 tokens [...] -> :class:`Logprobs` (top ones sorted, largest first)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_values, top_ids = jax.lax.top_k(lp, k)
    chosen = jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return Logprobs(chosen, top_ids.astype(jnp.int32), top_values)


def mask_words(vocab: int) -> int:
    """int32 words of a packed allowed-token mask over ``vocab`` ids (bit ``v % 32`` of word ``v // 32``)."""
    return (vocab + 31) // 32


def unpack_mask(allowed: jax.Array, vocab: int) -> jax.Array:
    """Packed int32 [B, mask_words(V)] (llguidance's bitmask layout) -> bool [B, V]."""
    bits = jnp.right_shift(allowed[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(allowed.shape[0], -1)[:, :vocab].astype(bool)


def sample(logits: jax.Array, params: SlotSampling, counts: jax.Array, bias: jax.Array | None = None,
           allowed: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, V] -> int32 tokens [B]; row b draws with ``fold_in(key[b], counts[b])``.
    ``bias``: float32 [B, V] added to the logits first (logit_bias, penalties; :meth:`SlotBias.dense`).
    ``allowed``: packed int32 [B, mask_words(V)] (all bits set = unconstrained): tokens outside it get -inf
    (constrained decoding), for greedy and sampled rows alike."""
    if bias is not None:
        logits = logits + bias
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


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, cap: int = TOP_K_CAP) -> jax.Array:
    """Set to -inf every logit outside the top-k (``top_k`` [B], 0 = off), then outside the top-p
    nucleus of what is left (``top_p`` [B], 1 = off). logits float32 [B, V].

    From ``lax.top_k(logits, cap)`` where that decides (top_k <= cap, or top_k 0 and a nucleus among
    the cap largest); the radix search (:func:`filter_logits_exact`) runs only when some row needs it."""
    v = logits.shape[-1]
    cap = min(cap, v)
    vals, idx = jax.lax.top_k(logits, cap)  # [B, cap], largest first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    small_k = k <= cap
    kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, cap - 1)[:, None], axis=1)
    masked = jnp.where(small_k[:, None] & (logits < kth), -jnp.inf, logits)
    probs = jax.nn.softmax(masked, axis=-1)
    top_probs = jnp.take_along_axis(probs, idx, axis=1)  # sorted too (softmax is monotone)
    reached = jnp.cumsum(top_probs, axis=1) >= top_p[:, None]
    cut = jnp.take_along_axis(top_probs, jnp.argmax(reached, axis=1)[:, None], axis=1)
    nucleus = top_p < 1
    fast = jnp.where(small_k | (top_k == 0), ~nucleus | jnp.any(reached, axis=1), False)
    out = jnp.where(nucleus[:, None] & (probs < cut), -jnp.inf, masked)
    return jax.lax.cond(jnp.all(fast), lambda: out,
                        lambda: jnp.where(fast[:, None], out, filter_logits_exact(logits, top_k, top_p)))


def filter_logits_exact(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, digit_bits: int = 4) -> jax.Array:
    """:func:`filter_logits` by radix search only: 2 x 32 / ``digit_bits`` passes over [B, V] (16 with
    the default 4-bit digits; ``digit_bits=1`` is plain bisection), whatever top_k and top_p."""
    v = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    keys = _sortable(logits)
    kth = _largest_threshold(keys, lambda keep: jnp.sum(keep, axis=-1) >= k[:, None], digit_bits)
    logits = jnp.where(keys >= kth[:, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    pkeys = _sortable(probs)
    cut = _largest_threshold(
        pkeys, lambda keep: jnp.sum(jnp.where(keep, probs[:, None, :], 0.0), axis=-1) >= top_p[:, None], digit_bits)
    cut = jnp.where(top_p < 1, cut, 0)
    return jnp.where(pkeys >= cut[:, None], logits, -jnp.inf)


def _sortable(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (negative values bit-flipped, positive ones offset)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, ok, digit_bits: int = 4) -> jax.Array:
    """Per row, the largest uint32 ``t`` with ``ok(keys >= t)`` (``ok``: [B, J, V] bool -> [B, J] bool,
    one column per candidate; true at t = 0 and monotone), built one ``digit_bits``-bit digit at a time
    from the top: each of the 32 / digit_bits passes over ``keys`` [B, V] tries all 2**digit_bits - 1
    nonzero digits at once and keeps the largest that is ok (the same ``t`` as bit-by-bit bisection)."""
    if digit_bits not in (1, 2, 4, 8):
        raise ValueError(f"digit_bits must be 1, 2, 4 or 8, got {digit_bits}")
    digits = jnp.arange(1, 1 << digit_bits, dtype=jnp.uint32)  # [J]

    def step(i, t):
        shift = (32 - digit_bits * (i + 1)).astype(jnp.uint32)
        cand = t[:, None] | (digits[None, :] << shift)  # [B, J], ascending
        good = ok(keys[:, None, :] >= cand[:, :, None])  # [B, J]: a prefix of trues (ok is monotone)
        return t | (jnp.sum(good, axis=1).astype(jnp.uint32) << shift)

    return jax.lax.fori_loop(0, 32 // digit_bits, step, jnp.zeros(keys.shape[:1], jnp.uint32))
