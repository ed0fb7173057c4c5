"""Length-bucketed decode on the tiny model (float32): full-attention layers read only the first
``kv_len`` cache slots (the smallest power-of-two bucket holding the active sequences), sliding layers
their ring. Against the whole-cache step: the same logits and caches at bucket boundaries and with
batch rows of different lengths, on the exact and the blocked path and in the program compiled for a
GPU; the engine generates the same tokens across bucket changes and compiles a bounded number of
decode programs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.decode import Engine, SamplingParams
from gptoss_jax.decode.runner import Chunk, Runner, decode_bucket, decode_buckets, plan_chunks
from gptoss_jax.decode.sampling import SlotSampling
from gptoss_jax.layers import flash
from gptoss_jax.layers.attention import attend_kv_major, set_attention, visible_slots
from gptoss_jax.layers.kv_cache import LayerCache

CONTEXT = 320  # not a power of two: buckets 16, 32, 64, 128, 256, 320
CHUNK = 32
SLOTS = 4
SMALLEST = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=80, stop_token_ids=())


@pytest.fixture(scope="module")
def model(tiny_hf):
    return gptoss_jax.load(tiny_hf, dtype=jnp.float32)


def prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 1024, n).tolist()  # no tiny stop id (2)


def test_buckets_are_powers_of_two_up_to_the_context():
    assert decode_buckets(CONTEXT, SMALLEST) == (16, 32, 64, 128, 256, 320)
    assert decode_buckets(4096) == (1024, 2048, 4096)
    assert len(decode_buckets(131072)) == 8  # log2(131072 / 1024) + 1
    assert decode_buckets(CONTEXT) == (CONTEXT,) and decode_buckets(1024) == (1024,)
    assert decode_buckets(1000, 100) == (128, 256, 512, 1000)  # the smallest rounded up to a power of two
    buckets = decode_buckets(CONTEXT, SMALLEST)
    assert [decode_bucket(n, buckets) for n in (1, 16, 17, 32, 33, 256, 257, 320, 400)] == \
        [16, 16, 32, 32, 64, 256, 320, 320, 320]
    for bad in ((0, 16), (320, 0), (320.0, 16), (True, 16)):
        with pytest.raises(ValueError, match="positive integer"):
            decode_buckets(*bad)


@pytest.mark.parametrize("impl", ["xla", "blocked"])
def test_attention_over_the_visible_slots_equals_the_whole_cache(impl):
    """One query per row at positions 15, 16, 40, 63 (rows of different lengths, at and around the
    bucket edges 16 and 64) over a 320-slot full-layer cache, against its first 64 slots; blocked with
    16-key blocks (several blocks, the same block edges either way: equal bit for bit)."""
    rng = np.random.default_rng(0)
    b, nq, nkv, d, s, kv_len = 4, 4, 2, 8, CONTEXT, 64
    q_pos = np.array([[15], [16], [40], [63]], np.int32)
    k_pos = np.where(np.arange(s)[None] <= q_pos, np.arange(s)[None], -1).astype(np.int32)
    k_pos[1, 100:120] = np.arange(100, 120)  # stale slots past the query (a longer earlier sequence): invisible
    k = rng.standard_normal((b, nkv, s, d), np.float32)
    v = rng.standard_normal((b, nkv, s, d), np.float32)
    q = jnp.asarray(rng.standard_normal((b, 1, nq, d), np.float32))
    sinks = jnp.asarray(rng.standard_normal(nq, np.float32))
    whole = LayerCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(k_pos))
    cut = visible_slots(whole, kv_len)
    assert cut.k.shape == (b, nkv, kv_len, d) and cut.pos.shape == (b, kv_len)
    assert visible_slots(whole, None) is whole and visible_slots(whole, s) is whole
    with pytest.raises(ValueError, match="kv_len"):
        visible_slots(whole, 0)

    def run(c):
        kw = {"block_q": 16, "block_k": 16} if impl == "blocked" else {}
        if impl == "blocked":
            return flash.block_attention_kv_major(q, c.k, c.v, sinks, jnp.asarray(q_pos), c.pos, 0, **kw)
        return attend_kv_major(q, c.k, c.v, sinks, jnp.asarray(q_pos), c.pos, 0, impl="xla")

    want, got = np.asarray(run(whole)), np.asarray(run(cut))
    if impl == "blocked":
        np.testing.assert_array_equal(got, want)
    else:  # softmax sums of 64 and 320 terms (the extra ones exactly 0): float32 rounding apart
        np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(np.float32).eps)


def _run(runner: Runner, steps: int):
    """Slots 0..3 hold prompts of 15, 16, 31 and 45 tokens (slot 2 prefilled but idle for the first 10
    steps), then decode ``steps`` steps: -> (logits per step, the buckets run, final caches)."""
    greedy = SlotSampling.of(GREEDY, np.zeros(2, np.uint32))
    for slot, n in enumerate((15, 16, 31, 45)):
        p = prompt(slot, n)
        for start, k, bucket in plan_chunks(n, CHUNK):
            runner.prefill([Chunk(slot, p[start:start + k], start, greedy)], bucket)
    logits, buckets = [], []
    for i in range(steps):
        active = np.array([True, True, i >= 10, True])
        buckets.append(runner.bucket(active))
        logits.append(np.asarray(runner.decode(active)[1]))
    return np.stack(logits), buckets, jax.tree.map(np.asarray, runner.state.cache)


def _assert_same_run(bucketed, whole, steps: int, exact_keys: bool):
    got, buckets, got_cache = _run(bucketed, steps)
    want, whole_buckets, want_cache = _run(whole, steps)
    assert whole_buckets == [CONTEXT] * steps
    # slot 3 (45 prompt tokens) leads: 46 slots -> 64, 65 -> 128 (step 19), 129 -> 256 (step 83)
    assert buckets[0] == 64 and buckets[18] == 64 and buckets[19] == 128 and buckets[-1] == (256 if steps > 83 else 128)
    assert bucketed.compiled_buckets == set(buckets)
    atol = 0 if exact_keys else 1e-5  # float32 rounding of softmax sums over different lengths
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    for c_got, c_want in zip(got_cache, want_cache):  # the whole cache was written in place
        np.testing.assert_array_equal(c_got.pos, c_want.pos)
        np.testing.assert_allclose(c_got.k, c_want.k, rtol=0, atol=atol)
        np.testing.assert_allclose(c_got.v, c_want.v, rtol=0, atol=atol)


@pytest.mark.slow
def test_bucketed_steps_equal_whole_cache_steps_on_the_exact_path(model):
    """'auto' on this tiny model: the exact path (at most one key block) over the bucket's slots."""
    kw = dict(max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    _assert_same_run(Runner(model, kv_bucket_min=SMALLEST, **kw), Runner(model, kv_bucket_min=CONTEXT, **kw), 90,
                     exact_keys=False)


@pytest.mark.slow
def test_bucketed_steps_equal_whole_cache_steps_on_the_blocked_path(tiny_hf, monkeypatch):
    """Every layer on the blocked path with 16-key blocks (the buckets are multiples: the same blocks are
    visited either way, so the same values bit for bit)."""
    monkeypatch.setattr(flash, "BLOCK_K", 16)
    monkeypatch.setattr(flash, "BLOCK_Q", 16)
    blocked = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    set_attention(blocked, "blocked")
    kw = dict(max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    _assert_same_run(Runner(blocked, kv_bucket_min=SMALLEST, **kw), Runner(blocked, kv_bucket_min=CONTEXT, **kw), 30,
                     exact_keys=True)


@pytest.mark.slow
def test_bucketed_steps_equal_whole_cache_steps_in_the_gpu_program(model, monkeypatch):
    """The decode step as compiled for a GPU (decode's exact path over the bucket, writes that drop idle
    rows), compiled for this CPU. (The experts keep the CPU path: the GPU's Triton MoE kernel cannot run
    here and is tested in test_mxfp4_gmm.py.)"""
    monkeypatch.setenv("GPTOSS_MOE_KERNEL", "off")
    kw = dict(max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    runners = [Runner(model, kv_bucket_min=m, **kw) for m in (SMALLEST, CONTEXT)]
    for r in runners:
        r.platform = "gpu"  # the accelerator's program choices, compiled for this CPU
    _assert_same_run(*runners, 30, exact_keys=False)


def test_decode_rejects_a_bucket_shorter_than_the_sequences(model):
    """(SLOTS slots, the other tests' shapes: its prefill program is theirs, not one more compile.)"""
    runner = Runner(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, kv_bucket_min=SMALLEST)
    runner.prefill([Chunk(0, prompt(0, 20), 0, SlotSampling.of(GREEDY, np.zeros(2, np.uint32)))], 32)
    first, second = np.array([True, False, False, False]), np.array([False, True, False, False])
    assert runner.bucket(first) == 32 and runner.bucket(second) == 16
    with pytest.raises(ValueError, match="shorter"):
        runner.decode(first, kv_len=16)
    with pytest.raises(ValueError, match="not a decode bucket"):
        runner.decode(first, kv_len=48)
    with pytest.raises(ValueError, match="active"):
        runner.decode(np.array([True, False]))


@pytest.mark.slow
def test_engine_tokens_across_bucket_changes_equal_the_whole_cache_engine(model, compilations):
    """Greedy generations from prompts of 5, 15, 30 and 60 tokens, 80 new tokens each: every bucket from
    16 to 256 is crossed, and the tokens are those of the engine that reads the whole cache. Warmup
    compiles one decode program per bucket; the generation then compiles nothing."""
    prompts = [prompt(20 + n, n) for n in (5, 15, 30, 60)]
    whole = Engine(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, kv_bucket_min=CONTEXT)
    want = whole.generate(prompts, GREEDY)
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, kv_bucket_min=SMALLEST)
    engine.warmup()
    assert engine.runner.compiled_buckets == set(decode_buckets(CONTEXT, SMALLEST))
    compilations.clear()
    got = engine.generate(prompts, GREEDY)
    assert compilations == [], f"{len(compilations)} compilations after warmup"
    assert [len(t) for t in got] == [80] * 4
    assert got == want
