"""The on-device sampler against a NumPy reference: supports, frequencies, seeds, greedy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.decode.sampling import SamplingParams, SlotSampling, filter_logits, sample


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' warper semantics by sorting: temperature, top-k (>= k-th largest), top-p (smallest
    prefix of the sorted probabilities whose mass reaches top_p), renormalised."""
    x = logits.astype(np.float64) / temperature
    if top_k > 0:
        x = np.where(x >= np.sort(x)[::-1][min(top_k, x.size) - 1], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])  # mass ranked above each token
        keep = np.zeros(p.size, bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.fixture(scope="module")
def sampler():
    return jax.jit(sample)


def rows(n: int, temperature, top_k, top_p, seed=0) -> SlotSampling:
    key = np.array([0, seed], np.uint32)
    return SlotSampling(jnp.full(n, temperature, jnp.float32), jnp.full(n, top_k, jnp.int32),
                        jnp.full(n, top_p, jnp.float32), jnp.asarray(np.tile(key, (n, 1))))


CONFIGS = [  # temperature, top_k, top_p
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.6), (2.0, 9, 0.95),
]


def test_frequencies_match_the_filtered_distribution(sampler):
    """6000 draws per configuration, all configurations in one batch (per-row parameters): every token
    drawn is in the reference support, every likely token of the support is drawn, and the empirical
    frequencies are within 5 standard errors of the reference probabilities."""
    logits = np.random.default_rng(0).normal(0, 1.5, 12).astype(np.float32)
    n = 6000
    batch = [rows(n, *c) for c in CONFIGS]
    params = SlotSampling(*(jnp.concatenate(parts) for parts in zip(*batch)))
    counts = jnp.tile(jnp.arange(n, dtype=jnp.int32), len(CONFIGS))  # one stream per draw
    drawn = np.asarray(sampler(jnp.tile(jnp.asarray(logits), (n * len(CONFIGS), 1)), params, counts))
    for i, config in enumerate(CONFIGS):
        expected = reference_distribution(logits, *config)
        freq = np.bincount(drawn[i * n:(i + 1) * n], minlength=logits.size) / n
        support = expected > 0
        assert not freq[~support].any(), f"{config}: drew tokens {np.flatnonzero(freq * ~support)} outside the support"
        assert (freq[expected > 0.02] > 0).all(), f"{config}: a likely token was never drawn"
        tol = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-3
        assert (np.abs(freq - expected) <= tol).all(), f"{config}: {freq.round(3)} vs {expected.round(3)}"
        assert support.sum() < logits.size or config == (1.0, 0, 1.0)  # every filter really cut something


def test_filter_support_equals_sorting_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (64, 1000)).astype(np.float32)
    top_k = rng.integers(0, 50, 64)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.1, 1e-6], 64)
    kept = np.isfinite(np.asarray(jax.jit(filter_logits)(logits, jnp.asarray(top_k, jnp.int32),
                                                          jnp.asarray(top_p, jnp.float32))))
    for b in range(64):
        expected = reference_distribution(logits[b], 1.0, int(top_k[b]), float(top_p[b])) > 0
        np.testing.assert_array_equal(kept[b], expected, err_msg=f"row {b}: top_k={top_k[b]} top_p={top_p[b]}")


def test_ties_at_the_boundary_are_kept():
    logits = jnp.array([[3.0, 1.0, 1.0, 1.0, 0.0]])
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.array([2]), jnp.array([1.0]))))
    np.testing.assert_array_equal(kept[0], [True, True, True, True, False])


def test_greedy_rows_take_the_argmax_and_seeds_reproduce(sampler):
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(8, 50)), jnp.float32)
    greedy = np.asarray(sampler(logits, rows(8, 0.0, 3, 0.5), jnp.zeros(8, jnp.int32)))
    np.testing.assert_array_equal(greedy, np.asarray(logits).argmax(-1))
    counts = jnp.arange(8, dtype=jnp.int32)
    a = np.asarray(sampler(logits, rows(8, 1.0, 0, 1.0, seed=7), counts))
    b = np.asarray(sampler(logits, rows(8, 1.0, 0, 1.0, seed=7), counts))
    np.testing.assert_array_equal(a, b)
    draws = {tuple(np.asarray(sampler(logits, rows(8, 1.0, 0, 1.0, seed=s), counts))) for s in range(6)}
    assert len(draws) > 1  # different seeds, different draws
    # a mixed batch: greedy rows stay greedy next to sampled ones
    mixed = SlotSampling(jnp.array([0.0, 1.0] * 4), jnp.zeros(8, jnp.int32), jnp.ones(8), rows(8, 1, 0, 1).key)
    out = np.asarray(sampler(logits, mixed, counts))
    np.testing.assert_array_equal(out[::2], np.asarray(logits).argmax(-1)[::2])


@pytest.mark.parametrize("field, value, match", [
    ("temperature", -0.1, "temperature"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"),
    ("top_k", -1, "top_k"), ("max_tokens", 0, "max_tokens"), ("seed", -3, "seed"),
    ("stop_token_ids", (1, "x"), "stop_token_ids"), ("temperature", float("nan"), "temperature"),
])
def test_sampling_params_reject_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**{field: value})


def test_top_k_path_keeps_what_the_bisection_keeps():
    """The lax.top_k path (top_k <= cap, nuclei among the cap largest) and its bisection fallback (top_k
    over the cap, flat nuclei) keep exactly the tokens the bisection alone keeps, row by row."""
    from gptoss_jax.decode.sampling import filter_logits_exact

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (96, 2000)).astype(np.float32)
    logits[::7] = rng.normal(0, 0.05, (14, 2000))  # flat rows: nuclei far beyond the cap
    logits[5, :10] = logits[5, 0]  # ties at the k-th value
    top_k = rng.choice([0, 1, 3, 10, 63, 64, 65, 200], 96).astype(np.int32)
    top_p = rng.choice([1.0, 0.95, 0.6, 0.2, 1e-6], 96).astype(np.float32)
    fast = np.isfinite(np.asarray(jax.jit(filter_logits, static_argnums=3)(logits, top_k, top_p, 64)))
    exact = np.isfinite(np.asarray(jax.jit(filter_logits_exact)(logits, top_k, top_p)))
    np.testing.assert_array_equal(fast, exact)
    # and the top-k path alone decides when every row allows it
    small = np.minimum(top_k, 64) + (top_k == 0)
    kept = np.isfinite(np.asarray(filter_logits(logits[1::7], jnp.asarray(small[1::7]), jnp.asarray(top_p[1::7]))))
    for b, row in enumerate(range(1, 96, 7)):
        expected = reference_distribution(logits[row], 1.0, int(small[row]), float(top_p[row])) > 0
        np.testing.assert_array_equal(kept[b], expected)


def test_radix_search_keeps_what_bisection_keeps():
    """filter_logits_exact with 4- and 8-bit digits (8 / 4 passes per threshold) finds the same k-th
    value and nucleus cut as bit-by-bit bisection (32 passes): the same kept set, row by row, including
    ties, flat rows, top_k above the cap and tiny or absent nuclei."""
    from gptoss_jax.decode.sampling import filter_logits_exact

    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (64, 3000)).astype(np.float32)
    logits[::5] = rng.normal(0, 0.05, (13, 3000))  # flat rows
    logits[3, :40] = logits[3, 0]  # ties at the k-th value
    logits[4, 100:] = -np.inf  # masked tokens (constrained decoding)
    top_k = rng.choice([0, 1, 7, 64, 65, 500, 2999, 3000], 64).astype(np.int32)
    top_p = rng.choice([1.0, 0.99, 0.9, 0.5, 1e-6], 64).astype(np.float32)
    exact = jax.jit(filter_logits_exact, static_argnums=3)
    bisected = np.asarray(exact(logits, top_k, top_p, 1))
    for bits in (4, 8):
        np.testing.assert_array_equal(np.asarray(exact(logits, top_k, top_p, bits)), bisected)
    with pytest.raises(ValueError, match="digit_bits"):
        filter_logits_exact(logits, top_k, top_p, 3)


def test_logit_bias_and_penalties_in_the_jitted_sampler_compile_once():
    """logit_bias and presence/frequency penalties are step inputs: bias -100 bans the argmax, +100
    forces a token, penalties push seen tokens down, and new values never recompile the sampler."""
    from gptoss_jax.decode.sampling import SlotBias

    logits = jnp.asarray(np.random.default_rng(4).normal(size=(4, 300)), jnp.float32)
    top = np.asarray(logits).argmax(-1)
    traces = []

    @jax.jit
    def step(logits, params, counts, bias, seen):
        traces.append(1)
        return sample(logits, params, counts, bias.dense(seen))

    def bias(params_list):
        return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *[SlotBias.of(p) for p in params_list])

    greedy = rows(4, 0.0, 0, 1.0)
    none = jnp.zeros((4, 300), jnp.int32)
    out = np.asarray(step(logits, greedy, jnp.zeros(4, jnp.int32), bias([SamplingParams()] * 4), none))
    np.testing.assert_array_equal(out, top)
    banned = [SamplingParams(logit_bias={int(t): -100}) for t in top]
    out = np.asarray(step(logits, greedy, jnp.zeros(4, jnp.int32), bias(banned), none))
    assert (out != top).all()
    forced = [SamplingParams(logit_bias=((7, 100.0),))] * 4
    hot = rows(4, 1.0, 0, 1.0)
    out = np.asarray(step(logits, hot, jnp.arange(4, dtype=jnp.int32), bias(forced), none))
    np.testing.assert_array_equal(out, [7] * 4)
    seen = jnp.asarray(np.eye(300, dtype=np.int32)[top] * 3)
    penal = [SamplingParams(presence_penalty=0.0, frequency_penalty=2.0)] * 2 + [SamplingParams(presence_penalty=2.0)] * 2
    out = np.asarray(step(logits, greedy, jnp.zeros(4, jnp.int32), bias(penal), seen))
    want = (np.asarray(logits) - np.eye(300)[top] * np.array([6.0, 6, 2, 2])[:, None]).argmax(-1)
    np.testing.assert_array_equal(out, want)
    assert len(traces) == 1 and step._cache_size() == 1  # one program for every bias and penalty


def test_logprobs_are_the_log_softmax():
    from gptoss_jax.decode.sampling import logprobs

    logits = np.random.default_rng(5).normal(0, 4, (3, 500)).astype(np.float32)
    lp = jax.jit(logprobs)(logits, jnp.array([0, 1, 2]))
    want = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lp.chosen), want[[0, 1, 2], [0, 1, 2]], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(lp.top_ids), np.argsort(-want, axis=-1)[:, :20])
    np.testing.assert_allclose(np.asarray(lp.top_values), -np.sort(-want, axis=-1)[:, :20], atol=1e-4)
