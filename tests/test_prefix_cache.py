"""Prefix caching on the tiny model (float32): requests sharing a prompt prefix with earlier ones
restore its blocks' KV (full layers' blocks, sliding layers' ring snapshots) instead of prefilling
them, and give the same tokens (greedy) and logits as without the cache: prefixes longer than the
window, hits ending mid-block, eviction, concurrent requests."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.decode import Engine, SamplingParams
from gptoss_jax.decode.prefix_cache import block_hashes
from gptoss_jax.decode.runner import Chunk, Runner, plan_chunks
from gptoss_jax.decode.sampling import SlotSampling

CONTEXT = 160  # 20 windows of the tiny model's 8
CHUNK = 16  # = the prefix block: two windows
SLOTS = 3
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=())


@pytest.fixture(scope="module")
def model(tiny_hf):
    return gptoss_jax.load(tiny_hf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def plain(model):
    return Engine(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK)


def ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 1024, n).tolist()


SHARED = ids(0, 70)  # 4 full blocks + 6 tokens: 8.75 windows


def test_block_hashes_chain():
    a, b = block_hashes(SHARED, CHUNK), block_hashes(SHARED[:40] + [5] * 30, CHUNK)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes(SHARED[16:32], CHUNK)[0] != a[1]  # same ids, other parent: another block


@pytest.mark.slow
def test_cached_tokens_equal_uncached(model, plain):
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, prefix_cache_blocks=16)
    prompts = [SHARED + ids(1, 9),        # miss: saves 4 blocks
               SHARED + ids(2, 25),       # hit 4 blocks (64 tokens, 8 windows), ends mid-block
               SHARED[:40] + ids(3, 30),  # hit 2 blocks: the shared part ends mid-block 2
               SHARED[:64]]               # 64 tokens: 3 blocks usable (the last token always runs)
    want = plain.generate(prompts, GREEDY)
    got = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert got == want
    s = engine.prefix.status()
    assert s["hit_blocks"] == 4 + 2 + 3 and s["lookups"] == 4 and 0 < s["hit_rate"] < 1
    assert s["saves"] == 4 + 1 + 2  # the second adds block 4 of its own, the third blocks 2 and 3


def test_concurrent_and_eviction(model, plain):
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, prefix_cache_blocks=3)
    prompts = [SHARED + ids(10 + i, 5 + i) for i in range(5)]
    want = plain.generate(prompts, GREEDY)
    assert engine.generate(prompts, GREEDY) == want  # together: misses and hits of blocks still being saved
    assert engine.generate(prompts[::-1], GREEDY) == want[::-1]
    s = engine.prefix.status()
    assert s["evictions"] > 0 and s["used"] == 3 and s["hit_blocks"] > 0
    other = [ids(20, 50), SHARED + ids(21, 3)]
    assert engine.generate(other, GREEDY) == plain.generate(other, GREEDY)


def test_restored_rows_give_same_logits(model):
    """A slot restored from the pool, then prefilled to the end, decodes the same logits as a slot
    prefilled from scratch (float32 rounding: both compute the same programs on the same values)."""
    runner = Runner(model, max_batch=2, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    from gptoss_jax.decode.prefix_cache import PrefixCache

    cache = PrefixCache(runner, 8, CHUNK)
    prompt = SHARED + ids(30, 11)
    hashes = block_hashes(prompt, CHUNK)
    off = SlotSampling.of(SamplingParams(temperature=0.0), np.zeros(2, np.uint32))
    for start, n, bucket in plan_chunks(len(prompt), CHUNK):  # slot 0 from scratch, saving its blocks
        runner.prefill([Chunk(0, prompt[start:start + n], start, off)], bucket)
        if n == CHUNK:
            cache.save(runner.state, 0, hashes, start // CHUNK)
    hit = cache.lookup(hashes, len(prompt))
    assert len(hit) == 5  # 81 tokens: 5 blocks, 1 left
    runner.state = cache.restore(runner.state, 1, hit)
    done = len(hit) * CHUNK
    for start, n, bucket in plan_chunks(len(prompt) - done, CHUNK):
        runner.prefill([Chunk(1, prompt[done + start:done + start + n], done + start, off)], bucket)
    for layer, c in enumerate(runner.state.cache):
        np.testing.assert_array_equal(np.asarray(c.pos[0]), np.asarray(c.pos[1]), err_msg=f"layer {layer}")
        np.testing.assert_array_equal(np.asarray(c.k[0]), np.asarray(c.k[1]), err_msg=f"layer {layer}")
    for _ in range(3):
        tokens, logits = runner.decode(np.ones(2, bool))
        logits = np.asarray(logits)
        np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(logits[0]).max())
        assert np.asarray(tokens)[0] == np.asarray(tokens)[1]
