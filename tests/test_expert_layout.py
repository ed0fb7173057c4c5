"""Packed experts stored in the TPU layout (``load(..., expert_layout='tpu')``, what the loader picks for
parameters on TPU devices) against the checkpoint layout: the stored arrays convert back exactly, and
prefill and decode give the same logits on the exact path (CPU: unpack / matvec of either layout) and
through the TPU kernel (Pallas interpret mode) reading the stored words."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.decode import SamplingParams
from gptoss_jax.decode.runner import Chunk, Runner
from gptoss_jax.decode.sampling import SlotSampling
from gptoss_jax.layers.moe import MoE, set_expert_layout

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=())


@pytest.fixture(scope="module")
def models(tiny_hf):
    return gptoss_jax.load(tiny_hf, dtype=jnp.float32), gptoss_jax.load(tiny_hf, dtype=jnp.float32, expert_layout="tpu")


def _moes(model):
    return [n for _, n in nnx.iter_graph(model) if isinstance(n, MoE)]


def test_loading_in_the_tpu_layout_stores_words_that_convert_back(models, tiny_hf):
    ckpt, tpu = models
    assert gptoss_jax.load(tiny_hf, dtype=jnp.float32).layers[0].mlp.expert_layout == "checkpoint"  # on CPU: as stored
    for a, b in zip(_moes(ckpt), _moes(tpu)):
        assert b.expert_layout == "tpu"
        for name in ("gate_up", "down"):
            words, scales = getattr(b, f"{name}_blocks")[...], getattr(b, f"{name}_scales")[...]
            assert words.dtype == jnp.uint32 and words.shape[-1] == getattr(a, f"{name}_scales").shape[1]  # N minor
            assert getattr(b, f"{name}_blocks").get_metadata()["out_sharding"][0] == "experts"
            blocks, back = mxfp4.from_tpu(words, scales, k=getattr(a, f"{name}_scales").shape[-1] * mxfp4.BLOCK)
            np.testing.assert_array_equal(np.asarray(blocks), np.asarray(getattr(a, f"{name}_blocks")[...]))
            np.testing.assert_array_equal(np.asarray(back), np.asarray(getattr(a, f"{name}_scales")[...]))
    with pytest.raises(ValueError, match="expert_layout"):
        gptoss_jax.load(tiny_hf, dtype=jnp.float32, expert_layout="gpu")


def test_set_expert_layout_round_trips_abstract_and_concrete(tiny_cfg):
    model = nnx.eval_shape(lambda: gptoss_jax.GptOss(tiny_cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    set_expert_layout(model, "tpu")
    moe = model.layers[0].mlp
    g = tiny_cfg.hidden_size // 32
    assert moe.gate_up_blocks.shape == (tiny_cfg.num_experts, mxfp4.tpu_word_rows(g * 32), 2 * tiny_cfg.intermediate_size)
    assert moe.gate_up_scales.shape == (tiny_cfg.num_experts, mxfp4.scale_rows(g), 2 * tiny_cfg.intermediate_size)
    set_expert_layout(model, "checkpoint")
    assert moe.gate_up_blocks.shape == (tiny_cfg.num_experts, 2 * tiny_cfg.intermediate_size, g, 16)
    assert moe.gate_up_blocks.get_metadata()["out_sharding"] == ("experts", "mlp", "embed", None)


def _run(model):
    """Prefill a 21-token prompt (chunks 16 + 5) in slot 1, then 6 decode steps of slots 1 and 2 (2 holds a
    7-token prompt): the logits of every decode step and the prefills' first tokens."""
    jax.clear_caches()  # $GPTOSS_MOE_KERNEL is read while tracing, not part of the jit cache key
    runner = Runner(model, max_batch=3, context=64, prefill_chunk=16, return_logits=True)
    greedy = SlotSampling.of(GREEDY, np.zeros(2, np.uint32))
    rng = np.random.default_rng(0)
    p1, p2 = rng.integers(3, 1024, 21).tolist(), rng.integers(3, 1024, 7).tolist()
    firsts = [runner.prefill([Chunk(1, p1[:16], 0, greedy)], 16)[0], runner.prefill([Chunk(1, p1[16:], 16, greedy)], 16)[0],
              runner.prefill([Chunk(2, p2, 0, greedy)], 16)[0]]
    steps = [np.asarray(runner.decode(np.array([False, True, True]))[1]) for _ in range(6)]
    return np.asarray(firsts), np.stack(steps)


@pytest.fixture(scope="module")
def checkpoint_run(models):
    """_run of the checkpoint layout on the exact path: the reference of both kernel modes (run once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTOSS_MOE_KERNEL", "off")
        return _run(models[0])


@pytest.mark.parametrize("kernel", ["off", pytest.param("interpret", marks=pytest.mark.slow)])
def test_tpu_layout_gives_the_same_logits_in_prefill_and_decode(models, checkpoint_run, monkeypatch, kernel):
    """Checkpoint layout on the exact path vs the TPU layout on the exact path ('off') or through the TPU
    kernel in interpret mode (also for one-token steps): float32 sums in another order, <= 1e-5."""
    _, tpu = models
    want_first, want = checkpoint_run
    monkeypatch.setenv("GPTOSS_MOE_KERNEL", kernel)
    got_first, got = _run(tpu)
    np.testing.assert_array_equal(got_first, want_first)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))
    assert np.abs(want).max() > 0
