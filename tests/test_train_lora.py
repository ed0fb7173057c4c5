"""LoRA on the tiny model: fresh adapters change nothing, training moves only adapters (the MXFP4 base
stays bit-identical), a tiny dataset is overfit, packed rows equal their samples alone, merging
reproduces the adapted model."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import re

import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax import mxfp4
from gptoss_jax.checkpoint.shapes import flat_paths
from train import data, lora, trainer
from train.config import OptimizerConfig
from train.optim import make_optimizer
from train.step import from_tree, make_train_step


def _samples(n, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [data.Sample(rng.integers(0, vocab, length).astype(np.int32), np.ones(length, bool), f"s{i}")
            for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 24), (1, 3)], ids=["grouped", "gather"])
def test_fresh_adapters_leave_logits_bit_identical(tiny_hf, tiny_cfg, shape):
    tokens = np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, shape)
    model = gptoss_jax.load(tiny_hf, dtype=jnp.bfloat16)
    before = np.asarray(model.logits(tokens))
    lora.add_lora(model, rank=4, alpha=8.0)
    np.testing.assert_array_equal(np.asarray(model.logits(tokens)), before)
    # and adapters are really in the computation: a non-zero B changes the logits
    model.layers[1].mlp.lora.down.b.set_value(jnp.full_like(model.layers[1].mlp.lora.down.b[...], 0.05))
    assert np.abs(np.asarray(model.logits(tokens)) - before).max() > 1e-3


@pytest.mark.slow
def test_packed_row_equals_each_sample_alone(tiny_hf, tiny_cfg):
    """Segment isolation: three samples packed in one row (positions restart, segment ids differ) give
    the logits each sample gives alone; without segment ids they would not."""
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    samples = _samples(3, 14, tiny_cfg.vocab_size) + _samples(1, 9, tiny_cfg.vocab_size, seed=5)
    rows = data.pack(samples, 48)
    assert rows["tokens"].shape == (1, 48) and rows["segment_ids"].max() == 4
    fwd = nnx.jit(lambda m, t, p, s: m(t, p, segment_ids=s)[0])
    packed = np.asarray(fwd(model, rows["tokens"], rows["positions"], rows["segment_ids"]))
    leaky = np.asarray(fwd(model, rows["tokens"], rows["positions"], np.ones_like(rows["segment_ids"])))
    start, worst, leak = 0, 0.0, 0.0
    for s in samples:
        n = len(s.tokens) - 1
        alone = np.asarray(model.logits(s.tokens[None, :-1]))[0]
        worst = max(worst, np.abs(packed[0, start:start + n] - alone).max())
        leak = max(leak, np.abs(leaky[0, start:start + n] - alone).max())
        start += n
    assert worst <= 2e-5
    assert leak > 1e-2


@pytest.fixture(scope="module")
def lora_run(tiny_hf, tiny_cfg):
    """40 LoRA steps (rank 16, float32, packed MXFP4 base) on 8 random 33-token samples."""
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    base = {k: np.asarray(v[...]) for k, v in flat_paths(nnx.state(model, nnx.Param)).items()}
    lora.add_lora(model, rank=16, alpha=32.0, dropout=0.05)
    state = trainer.split(model, "lora")
    rows = data.pack(_samples(8, 33, tiny_cfg.vocab_size), 64)
    batch = {k: v[None] for k, v in rows.items()}
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, end_learning_rate=1e-3), 40)
    step = jax.jit(make_train_step(state.graphdef, state.template, tx))
    params, opt_state, losses = state.params, tx.init(state.params), []
    start = jax.tree.map(np.asarray, params)
    for i in range(40):
        params, opt_state, m = step(params, opt_state, state.frozen, batch, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    return {"state": state, "params": params, "start": start, "base": base, "losses": losses, "rows": rows}


@pytest.mark.slow
def test_lora_overfits_a_tiny_dataset(lora_run):
    losses = lora_run["losses"]
    print(f"LoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] <= 0.1 * losses[0]


@pytest.mark.slow
def test_lora_trains_only_adapters_and_base_stays_packed_and_bit_identical(lora_run):
    state, params = lora_run["state"], lora_run["params"]
    assert params.keys() == lora_run["start"].keys()
    assert all(re.fullmatch(r"layers\.\d+\.(attn\.lora\.[qkvo]|mlp\.lora\.(gate_up|down))\.[ab]", k) for k in params)
    assert all(not np.array_equal(np.asarray(params[k]), lora_run["start"][k]) for k in params)  # every adapter moved
    model = nnx.merge(state.graphdef, from_tree(state.template, params), state.frozen)
    after = {k: np.asarray(v[...]) for k, v in flat_paths(nnx.state(model, nnx.Param)).items()
             if ".lora." not in k}
    assert after.keys() == lora_run["base"].keys()
    for k, v in lora_run["base"].items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert after["layers.0.mlp.gate_up_blocks"].dtype == np.uint8  # the experts never left MXFP4


def _adapted_model(state, params):
    """A model of its own (fresh Variables: merging mutates in place) from trained ``params``."""
    return nnx.merge(state.graphdef, from_tree(state.template, jax.tree.map(jnp.asarray, params)),
                     jax.tree.map(lambda x: x, state.frozen))


@pytest.mark.slow
def test_merged_packed_model_matches_the_adapted_model(lora_run):
    """Merging into MXFP4 experts re-quantizes ``W + scale A B``: every merged weight is within half a
    grid step (one block scale) of the exact sum, attention merges exactly, and the merged logits sit
    much closer to the adapted model's than the base model's do."""
    state, params, rows = lora_run["state"], lora_run["params"], lora_run["rows"]
    adapted = _adapted_model(state, params)
    tokens = rows["tokens"][:2]
    want = np.asarray(adapted.logits(tokens))
    exact = {}
    for i, block in enumerate(adapted.layers):
        mlp, lo = block.mlp, block.mlp.lora
        for name, blocks, scales, adapter in (("gate_up", mlp.gate_up_blocks, mlp.gate_up_scales, lo.gate_up),
                                              ("down", mlp.down_blocks, mlp.down_scales, lo.down)):
            w = mxfp4.unpack_np(np.asarray(blocks[...]), np.asarray(scales[...]))
            delta = lora.delta(adapter, lora.DELTA_SPECS[name], lo.scale)
            exact[i, name] = w + np.swapaxes(np.asarray(delta), 1, 2)
    merged = lora.merge_lora(_adapted_model(state, params))
    assert not lora.has_lora(merged)
    for (i, name), w in exact.items():
        mlp = merged.layers[i].mlp
        blocks, scales = np.asarray(getattr(mlp, f"{name}_blocks")[...]), np.asarray(getattr(mlp, f"{name}_scales")[...])
        got = mxfp4.unpack_np(blocks, scales)
        step = np.repeat(np.exp2(scales.astype(np.float64) - 127), 32, axis=-1)  # the largest half-gap of E2M1 is 1
        assert (np.abs(got - w) <= step * (1 + 1e-6)).all(), (i, name)
    got = np.asarray(merged.logits(tokens))
    base = np.asarray(_adapted_model(state, lora_run["start"]).logits(tokens))  # B = 0: the base model
    err, moved = np.abs(got - want).mean(), np.abs(base - want).mean()
    print(f"merged-vs-adapted mean |logit error| {err:.4f}; base-vs-adapted {moved:.4f}")
    assert err <= 0.25 * moved


@pytest.mark.slow
def test_merge_with_dense_experts_is_exact_up_to_fp32_rounding(tiny_hf, tiny_cfg):
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32, experts="dense")
    lora.add_lora(model, rank=4, alpha=8.0, seed=3)
    rng = np.random.default_rng(0)
    for v in flat_paths(nnx.state(model, nnx.LoRAParam)).values():
        v.set_value(jnp.asarray(rng.normal(0, 0.05, v.shape), jnp.float32))
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 24))
    want = np.asarray(model.logits(tokens))
    got = np.asarray(lora.merge_lora(model).logits(tokens))
    assert np.abs(want).max() > 1 and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_chunked_loss_equals_the_full_logits_cross_entropy(tiny_hf, tiny_cfg):
    """cross_entropy_sum (loss tokens first, chunks without loss tokens skipped) against
    log-softmax of the model's own logits, value and gradient."""
    from train.step import cross_entropy_sum

    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 40))
    targets = jnp.asarray(rng.integers(0, tiny_cfg.vocab_size, (2, 40)))
    mask = jnp.asarray(rng.random((2, 40)) < 0.3)
    hidden, _ = model.hidden_states(jnp.asarray(tokens))

    def full(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("bth,vh->btv", h, w, precision="highest"), axis=-1)
        return -jnp.sum(jnp.where(mask, jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], 0.0))

    w = model.unembedding[...]
    want, want_g = jax.value_and_grad(full, argnums=(0, 1))(hidden, w)
    got, got_g = jax.value_and_grad(lambda h, w: cross_entropy_sum(h, w, targets, mask, chunk=16),
                                    argnums=(0, 1))(hidden, w)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(got_g, want_g):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
    np.testing.assert_allclose(float(model.logits(tokens).sum()), float(model.unembed(hidden).sum()), rtol=1e-6)


@pytest.mark.slow
def test_full_mode_trains_bf16_weights_with_float32_adam_state(tiny_hf):
    import optax

    from train.config import DataConfig, TrainConfig

    cfg = TrainConfig(checkpoint=tiny_hf, mode="full", dtype="bfloat16", data=DataConfig(train=["-"]))
    state = trainer.split(trainer.build_model(cfg), "full")
    assert "layers.0.mlp.gate_up_kernel" in state.params  # dense experts, every weight trainable
    assert {v.dtype for v in state.params.values()} == {jnp.dtype(jnp.bfloat16)}
    tx = make_optimizer(OptimizerConfig(), 10)
    opt = jax.eval_shape(tx.init, state.params)
    moments = optax.tree_utils.tree_get_all_with_path(opt, "mu") + optax.tree_utils.tree_get_all_with_path(opt, "nu")
    assert len(moments) == 2
    for _, tree in moments:
        assert tree.keys() == state.params.keys()
        assert {v.dtype for v in tree.values()} == {jnp.dtype(jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), state.params)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    assert {v.dtype for v in updates.values()} == {jnp.dtype(jnp.bfloat16)}
