"""The decoding engine on the tiny model (float32): cached decode against the full forward, greedy
generation against argmax rollouts and transformers' generate(), batching, continuous batching,
stops, seeds, cancellation, asyncio, and no recompilation."""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.decode import Engine, SamplingParams
from gptoss_jax.decode.runner import Chunk, Runner, plan_chunks
from gptoss_jax.decode.sampling import SlotSampling
from gptoss_jax.layers.kv_cache import cache_bytes

CONTEXT = 320  # 40 windows of the tiny model's 8
CHUNK = 32  # prefill buckets 16 and 32
SLOTS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=())


@pytest.fixture(scope="module")
def model(tiny_hf):
    return gptoss_jax.load(tiny_hf, dtype=jnp.float32)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK)
    engine.warmup()
    return engine


def prompt(seed: int, n: int, vocab: int = 1024) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()  # no tiny stop id (2) in prompts


def full_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    """Full-forward float32 logits of each sequence (no cache), 8 rows of CONTEXT at a time (one compile)."""
    out = []
    for i in range(0, len(sequences), 8):
        group = sequences[i:i + 8]
        tokens = np.zeros((8, CONTEXT), np.int32)
        mask = np.zeros((8, CONTEXT), np.int32)
        for r, s in enumerate(group):
            tokens[r, :len(s)], mask[r, :len(s)] = s, 1
        logits = np.asarray(model.logits(tokens, mask))
        out += [logits[r, :len(s)] for r, s in enumerate(group)]
    return out


def assert_argmax_rollout(model, prompts, completions):
    """Each completion token is the argmax of the full forward over prompt + the tokens before it."""
    for p, c, logits in zip(prompts, completions, full_logits(model, [p + c for p, c in zip(prompts, completions)])):
        np.testing.assert_array_equal(logits[len(p) - 1:len(p) + len(c) - 1].argmax(-1), c)


@pytest.mark.slow
def test_cached_decode_equals_full_forward_across_the_window(model):
    """Two requests in slots 1 and 3 (0 and 2 idle), prompts of 45 (chunks 32 + 13) and 7 tokens, then
    260 cached decode steps: every step's logits equal the full forward's at that position."""
    runner = Runner(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    greedy = SlotSampling.of(GREEDY, np.zeros(2, np.uint32))
    prompts = {1: prompt(0, 45), 3: prompt(1, 7)}
    seqs = {}
    for slot, p in prompts.items():
        for start, n, bucket in plan_chunks(len(p), CHUNK):
            first = runner.prefill([Chunk(slot, p[start:start + n], start, greedy)], bucket)[0]
        seqs[slot] = p + [int(first)]
    active = np.array([i in prompts for i in range(SLOTS)])
    steps = []
    for _ in range(260):
        tokens, logits = runner.decode(active)
        steps.append(np.asarray(logits))
        for slot in prompts:
            seqs[slot].append(int(tokens[slot]))
    for slot, p in prompts.items():
        full = full_logits(model, [seqs[slot][:-1]])[0]
        cached = np.stack([s[slot] for s in steps])  # logits after inputs at positions len(p) .. len(p)+259
        assert int(full[len(p) - 1].argmax()) == seqs[slot][len(p)]  # the prefill's first token
        err = np.abs(cached - full[len(p):]).max()
        print(f"slot {slot}: max |cached - full| logit error over 260 steps: {err:.2e}")
        assert err <= 1e-4


def _interleaved_run(runner):
    """Slot 3 decodes while slot 1's 45-token prompt is prefilled in two chunks between the steps (so
    slot 1 is idle with a half-filled cache); then both decode. -> (logits per step, final cache)."""
    greedy = SlotSampling.of(GREEDY, np.zeros(2, np.uint32))
    runner.prefill([Chunk(3, prompt(1, 7), 0, greedy)], 16)
    steps = []
    for i, (start, n, bucket) in enumerate(plan_chunks(45, CHUNK)):
        runner.prefill([Chunk(1, prompt(0, 45)[start:start + n], start, greedy)], bucket)
        for _ in range(3):
            steps.append(np.asarray(runner.decode(np.array([False, i == 1, False, True]))[1]))
    for _ in range(6):
        steps.append(np.asarray(runner.decode(np.array([False, True, False, True]))[1]))
    return np.stack(steps), jax.tree.map(np.asarray, runner.state.cache)


@pytest.mark.slow
def test_decode_write_dropping_idle_rows_equals_the_cpu_write(model, monkeypatch):
    """The decode step as compiled for a GPU/TPU (idle rows' cache writes dropped, no old value read,
    so the scatter is in place) gives the same logits and caches as the CPU program's write (idle rows
    rewrite their slot 0), with an idle slot holding a half-prefilled prompt. (The experts keep the
    CPU path: the GPU's Triton MoE kernel cannot run here and is tested in test_mxfp4_gmm.py.)"""
    monkeypatch.setenv("GPTOSS_MOE_KERNEL", "off")
    cpu = Runner(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    gpu = Runner(model, max_batch=SLOTS, context=CONTEXT, prefill_chunk=CHUNK, return_logits=True)
    gpu.platform = "gpu"  # the accelerator's program choices, compiled for this CPU
    want, want_cache = _interleaved_run(cpu)
    got, got_cache = _interleaved_run(gpu)
    # the two programs differ in XLA:CPU options (dot kernels): float32 rounding of O(1) values apart
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for c_got, c_want in zip(got_cache, want_cache):
        np.testing.assert_array_equal(c_got.pos, c_want.pos)
        np.testing.assert_allclose(c_got.k, c_want.k, rtol=0, atol=1e-5)
        np.testing.assert_allclose(c_got.v, c_want.v, rtol=0, atol=1e-5)


def test_greedy_batch_equals_each_prompt_alone_and_the_argmax_rollout(engine, model):
    prompts = [prompt(10 + i, n) for i, n in enumerate([1, 5, 17, 33, 64, 90])]  # 6 requests, 4 slots
    before = engine.stats.copy()
    batched = engine.generate(prompts, GREEDY)
    packed = engine.stats - before
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert batched == alone
    # the 1- and 5-token prompts (bucket 16) shared one prefill call (token budget CHUNK = 2 x 16)
    assert packed["prefill_chunks"] == sum(len(plan_chunks(len(p), CHUNK)) for p in prompts)
    assert packed["prefill_calls"] < packed["prefill_chunks"]
    assert all(len(c) == GREEDY.max_tokens for c in batched)
    assert_argmax_rollout(model, prompts, batched)


def test_greedy_equals_transformers_generate(engine, hf_reference):
    import torch

    prompts = [prompt(20, 9), prompt(21, 30)]
    ours = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(2,)))
    for p, c in zip(prompts, ours):
        with torch.no_grad():
            ids = hf_reference.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                        max_new_tokens=30, do_sample=False, eos_token_id=2, pad_token_id=0)
        assert ids[0, len(p):].tolist() == c


def test_stop_token_max_tokens_and_context_limit(engine):
    p = prompt(30, 12)
    rollout = engine.generate([p], GREEDY)[0]
    k = next(i for i in range(3, len(rollout)) if rollout[i] not in rollout[:i])  # first occurrence at k
    engine.start(warmup=False)
    try:
        stop = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=(rollout[k], 99999)))
        short = engine.submit(p, SamplingParams(temperature=0.0, max_tokens=7, stop_token_ids=()))
        full = engine.submit(prompt(31, CONTEXT - 20), SamplingParams(temperature=0.0, max_tokens=100, stop_token_ids=()))
        for r in (stop, short, full):
            r.result(timeout=60)
    finally:
        engine.stop()
    assert stop.tokens == rollout[:k + 1] and stop.finish_reason == "stop" and stop.stop_token == rollout[k]
    assert short.tokens == rollout[:7] and short.finish_reason == "length" and short.stop_token is None
    assert full.completion_tokens == 20 and full.finish_reason == "length"  # prompt + completion = context
    assert (stop.prompt_tokens, stop.completion_tokens) == (12, k + 1)


def test_prompt_and_engine_checks(engine, model):
    with pytest.raises(ValueError, match=f"prompt has {CONTEXT} tokens but the context holds {CONTEXT}"):
        engine.submit(prompt(0, CONTEXT), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match=r"prompt token 1 is 1024, outside the vocabulary \[0, 1024\)"):
        engine.submit([5, 1024], GREEDY)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)
    with pytest.raises(ValueError, match="exceeds the model's 1024 positions"):
        Engine(model, context=2048)


def test_seeds_reproduce_per_request_whatever_runs_beside(engine):
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=30, stop_token_ids=())
    p = prompt(40, 11)
    alone = engine.generate([p], seeded)[0]
    others = [prompt(41 + i, 20 + i) for i in range(4)]
    together = engine.generate(others[:2] + [p] + others[2:], seeded)[2]  # another slot, other neighbours
    assert together == alone
    other_seed = engine.generate([p], SamplingParams(temperature=1.0, seed=99, max_tokens=30, stop_token_ids=()))[0]
    assert other_seed != alone
    greedy = engine.generate([p], GREEDY)[0][:30]
    assert engine.generate([p], SamplingParams(temperature=0.0, seed=5, max_tokens=30, stop_token_ids=()))[0] == greedy


def test_continuous_batching_loses_no_request(engine, model):
    """12 requests from 3 threads into 4 slots, different prompt lengths and budgets: all complete with
    the greedy rollout, and waiting requests take slots while others are mid-generation."""
    specs = [(50 + i, n, m) for i, (n, m) in enumerate(zip([3, 40, 9, 70, 1, 25, 33, 12, 64, 5, 18, 48],
                                                           [30, 5, 60, 12, 45, 8, 20, 50, 3, 35, 16, 25]))]
    before = engine.stats.copy()
    requests = {}
    engine.start(warmup=False)
    try:
        def client(part):
            for seed, n, m in part:
                requests[seed] = engine.submit(prompt(seed, n), SamplingParams(temperature=0.0, max_tokens=m,
                                                                               stop_token_ids=()))
        threads = [threading.Thread(target=client, args=(specs[i::3],)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {seed: r.result(timeout=120) for seed, r in requests.items()}
    finally:
        engine.stop()
    assert sorted(results) == [s for s, *_ in specs]
    for seed, n, m in specs:
        assert len(results[seed]) == m and requests[seed].finish_reason == "length"
    prompts = [prompt(s, n) for s, n, _ in specs]
    assert_argmax_rollout(model, prompts, [results[s] for s, *_ in specs])
    stats = engine.stats - before
    assert stats["admitted"] == 12 and stats["admitted_while_decoding"] >= 4
    assert stats["decode_steps"] < 0.5 * sum(m for *_, m in specs)  # slots really decode together


def test_cancel_frees_the_slot_and_async_streams(engine):
    async def main():
        long = engine.submit(prompt(60, 10), SamplingParams(temperature=0.0, max_tokens=250, stop_token_ids=()))
        got = []
        async for tok in long.aiter():
            got.append(tok)
            if len(got) == 3:
                long.cancel()
        fills = [engine.submit(prompt(61 + i, 5), GREEDY) for i in range(SLOTS)]
        waiting = engine.submit(prompt(70, 5), GREEDY)  # queued behind the 4 fills
        waiting.cancel()
        streamed = await asyncio.gather(*(collect(r) for r in fills))
        return long, got, fills, streamed, waiting

    async def collect(r):
        return [t async for t in r]

    engine.start(warmup=False)
    try:
        long, got, fills, streamed, waiting = asyncio.run(main())
    finally:
        engine.stop()
    assert long.finish_reason == "cancelled" and got == long.tokens[:len(got)] and long.completion_tokens < 250
    assert waiting.finish_reason == "cancelled" and waiting.completion_tokens == 0
    assert [f.finish_reason for f in fills] == ["length"] * SLOTS
    assert streamed == [f.tokens for f in fills]


def test_a_failed_step_fails_its_requests_and_the_engine_recovers(engine, monkeypatch):
    real = engine.runner.decode_sampled
    calls = []

    def flaky(active, allowed=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real(active, allowed)

    monkeypatch.setattr(engine.runner, "decode_sampled", flaky)
    failed = engine.submit(prompt(100, 6), GREEDY)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate([prompt(101, 6)], GREEDY)
    assert failed.finish_reason == "error" and "device lost" in repr(failed.error)
    monkeypatch.setattr(engine.runner, "decode_sampled", real)
    assert engine.generate([prompt(102, 6)], GREEDY) == engine.generate([prompt(102, 6)], GREEDY)  # serving again


def test_stop_cancels_waiting_and_running_requests(engine):
    engine.start(warmup=False)
    running = [engine.submit(prompt(110 + i, 4), SamplingParams(temperature=0.0, max_tokens=300, stop_token_ids=()))
               for i in range(SLOTS + 2)]
    next(iter(running[0]))  # the loop is generating
    engine.stop()
    assert all(r.finish_reason in ("cancelled", "length") for r in running)
    assert any(r.finish_reason == "cancelled" and r.completion_tokens == 0 for r in running)  # never admitted
    assert not any(engine._slots) and not engine._waiting


def test_no_recompilation_across_lengths_and_tokens(engine, compilations):
    """After warmup, prompts of 11 lengths (1 to 5 chunks, every bucket) and 590 tokens, greedy and
    sampled, compile nothing; the listener itself does see a new compilation."""
    lengths = [1, 2, 15, 16, 17, 31, 32, 33, 64, 100, 150]
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=40, stop_token_ids=())
    outs = engine.generate([prompt(80 + n, n) for n in lengths], sampled)
    outs += engine.generate([prompt(90, 3)], SamplingParams(temperature=0.0, max_tokens=150, stop_token_ids=()))
    assert sum(map(len, outs)) == 40 * len(lengths) + 150
    assert compilations == [], f"{len(compilations)} compilations after warmup"
    jax.jit(lambda x: x * 3)(jnp.arange(7))  # a genuinely new executable is seen
    assert compilations


def test_sliding_layers_keep_a_ring_halving_the_cache():
    """Cache bytes of gpt-oss-20b at 131072 positions: 12 full layers of the context plus 12 rings of
    128 slots, about half of 24 full-length caches."""
    cfg = gptoss_jax.PRESETS["gpt-oss-20b"]
    per_slot = 2 * cfg.num_key_value_heads * cfg.head_dim * 2 + 4  # k + v (bf16) + position (int32)
    assert cache_bytes(cfg, 1, 131072) == 12 * 131072 * per_slot + 12 * 128 * per_slot
    assert cache_bytes(cfg, 1, 131072) / (24 * 131072 * per_slot) == pytest.approx(0.5, abs=0.001)


def test_packed_matvec_equals_the_unpacked_product():
    """The decode-time expert product reads MXFP4 bytes directly: every code, scales 2^-127 .. 2^20."""
    from gptoss_jax import mxfp4

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (48, 6, 16), dtype=np.uint8)
    blocks[0, 0] = np.arange(16, dtype=np.uint8) * 17  # each code in both nibbles
    scales = rng.integers(100, 147, (48, 6), dtype=np.uint8)
    scales[1, :2] = [0, 1]  # subnormal float32 scales
    x = rng.normal(size=6 * 32).astype(np.float32)
    dense = mxfp4.unpack_np(blocks, scales).astype(np.float64)
    got = np.asarray(jax.jit(mxfp4.matvec)(jnp.asarray(x), jnp.asarray(blocks), jnp.asarray(scales)))
    np.testing.assert_allclose(got, dense @ x, rtol=1e-5, atol=1e-30)
    np.testing.assert_array_equal(np.asarray(mxfp4.e2m1_values(jnp.arange(16))), mxfp4.FP4_VALUES)


@pytest.mark.slow
def test_logprobs_and_prompt_logprobs_are_the_full_forward_log_softmax(engine, model):
    """Greedy: each generated token's logprob (and its top alternatives) and each prompt token's logprob
    (a 45-token prompt, two chunks) equal the log-softmax of the full forward's logits; a logit_bias
    of -100 on the first greedy token changes it (no new program: the bias is a step input)."""
    p = prompt(120, 45)
    r = engine.submit(p, dataclasses.replace(GREEDY, max_tokens=5), logprobs=True, prompt_logprobs=True)
    engine.generate([p[:3]], GREEDY)  # drives the loop until both are done
    c = r.result()
    full = full_logits(model, [p + c])[0].astype(np.float64)
    lsm = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(p)
    for j in range(1, len(p)):
        np.testing.assert_allclose(r.prompt_logprobs[j][0], lsm[j - 1, p[j]], atol=1e-4)
    for i, (lp, ids, values) in enumerate(r.logprobs):
        row = lsm[len(p) - 1 + i]
        np.testing.assert_allclose(lp, row[c[i]], atol=1e-4)
        assert ids[0] == c[i] and values == sorted(values, reverse=True) and len(ids) == 20
        np.testing.assert_allclose(values, np.sort(row)[::-1][:20], atol=1e-4)
    banned = engine.generate([p], dataclasses.replace(GREEDY, max_tokens=2, logit_bias=((c[0], -100.0),)))[0]
    assert banned[0] != c[0]


def test_cache_write_keeps_bf16_off_the_cpu_with_the_same_cache():
    """The cache write scatters bf16 as raw 16-bit words only in a program for the CPU; elsewhere the
    values go as they are (on TPU the bits' bitcast forced a relayout of the whole cache per step).
    Same cache either way, dropped (padding) writes included."""
    from gptoss_jax import platform
    from gptoss_jax.layers.kv_cache import init_cache, update_cache

    cfg = gptoss_jax.get_preset("tiny")
    cache = init_cache(cfg, 3, 8, jnp.bfloat16)[1]
    shape = (3, 1, cfg.num_key_value_heads, cfg.head_dim)
    k = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.bfloat16)
    v = k * 2
    positions = jnp.asarray([[5], [-1], [9]], jnp.int32)

    def run(target):
        def f(cache, k, v, positions):
            with platform.lowering_for(target):
                return update_cache(cache, k, v, positions)
        return str(jax.make_jaxpr(f)(cache, k, v, positions)), jax.jit(f)(cache, k, v, positions)

    (tpu_jaxpr, tpu), (cpu_jaxpr, cpu) = run("tpu"), run("cpu")
    assert "bitcast_convert_type" not in tpu_jaxpr and "bitcast_convert_type" in cpu_jaxpr
    for a, b in zip(tpu, cpu):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert float(jnp.abs(tpu.k[0, :, 5].astype(jnp.float32) - k[0, 0].astype(jnp.float32)).max()) == 0
