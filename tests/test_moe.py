"""Router and experts against transformers' GptOssTopKRouter / GptOssExperts; SwiGLU clamp edges;
only the selected experts are ever computed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gptoss_jax import mxfp4
from gptoss_jax.layers.moe import experts_forward, router, swiglu
from tests.reference import to_np
from tests.tolerance import EPS, U, assert_within, dot_bound, gamma


def _experts(model, layer, fmt):
    """Expert weights of ``layer`` in ``fmt`` ('mxfp4' as loaded, or 'dense' decoded from it)."""
    w = model.layers[layer].mlp.expert_weights()
    if fmt == "dense":
        for name in ("gate_up", "down"):
            dense = mxfp4.unpack(w.pop(f"{name}_blocks"), w.pop(f"{name}_scales"), jnp.float32)  # [E, out, in]
            w[f"{name}_kernel"] = jnp.swapaxes(dense, 1, 2)
    return w


def _run(model, x, ids, weights, experts, path):
    cfg = model.config
    return np.asarray(experts_forward(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), experts,
                                      cfg.num_experts, cfg.swiglu_alpha, cfg.swiglu_limit, path))


@pytest.mark.parametrize("layer", [0, 2])
def test_router_matches_reference(layer, reference_run, tiny_model):
    _, _, records, _ = reference_run
    (x,), _, (_, scores, indices) = records[f"model.layers.{layer}.mlp.router"]
    mlp = tiny_model.layers[layer].mlp
    x, kernel, bias, k = to_np(x), np.asarray(mlp.router_kernel[...]), np.asarray(mlp.router_bias[...]), mlp.top_k
    weights, ids = router(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), k)
    weights, ids = np.asarray(weights), np.asarray(ids)
    np.testing.assert_array_equal(ids, indices.numpy())  # top-k, in torch.topk order
    # logits: H products and the bias summed in float32 on each side
    dl = np.take_along_axis(dot_bound(x, kernel, "nh,he->ne", extra_terms=1) + 2 * U * np.abs(bias), ids, -1)
    # softmax over the k: w_i moves by w_i (dl_i + sum_j w_j dl_j) for logit errors dl, plus each side's own
    # rounding: l_i - max (u |l_i - max| into exp), exp (1 ulp), the k-term sum and the division
    logits = np.take_along_axis(x.astype(np.float64) @ kernel + bias, ids, -1)
    own = 2 * (U * (logits.max(-1, keepdims=True) - logits) + EPS + gamma(k + 1))
    bound = weights * (dl + (weights * dl).sum(-1, keepdims=True) + own)
    assert_within(weights, to_np(scores), bound, "router weights")
    # softmax over the k only: k quotients of one k-term sum, summed again: gamma(2k + 1)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=gamma(2 * k + 1))


@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
@pytest.mark.parametrize("path", ["gather", "grouped"])
@pytest.mark.parametrize("layer", [0, 1])
def test_experts_match_reference(layer, path, fmt, reference_run, tiny_model):
    _, _, records, _ = reference_run
    (x, ids, weights), _, out = records[f"model.layers.{layer}.mlp.experts"]
    ours = _run(tiny_model, to_np(x), ids.numpy(), to_np(weights), _experts(tiny_model, layer, fmt), path)
    np.testing.assert_allclose(ours, to_np(out), rtol=0, atol=5e-6 * max(1, np.abs(to_np(out)).max()))


def test_experts_at_the_clamp_edges(reference_run, hf_reference, tiny_model):
    """Inputs scaled up so gate values pass +7 (clamped from above only) and up values pass +-7."""
    _, _, records, _ = reference_run
    (x, ids, weights), _, _ = records["model.layers.0.mlp.experts"]
    x = x * 6
    with torch.no_grad():
        ref = hf_reference.model.layers[0].mlp.experts(x, ids, weights).numpy()
    experts = _experts(tiny_model, 0, "mxfp4")
    # the pre-activations really are beyond the limit
    w = mxfp4.unpack_np(np.asarray(experts["gate_up_blocks"]), np.asarray(experts["gate_up_scales"]))
    h = np.einsum("nh,nkoh->nko", x.numpy(), w[ids.numpy()]) + np.asarray(experts["gate_up_bias"])[ids.numpy()]
    gate, up = h[..., 0::2], h[..., 1::2]
    assert (gate > 7).mean() > 0.05 and (gate < -7).mean() > 0.05
    assert (up > 7).mean() > 0.05 and (up < -7).mean() > 0.05
    for path in ("gather", "grouped"):
        ours = _run(tiny_model, x.numpy(), ids.numpy(), weights.numpy(), experts, path)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_swiglu_matches_reference_gate():
    from transformers import GptOssConfig as HFConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from gptoss_jax.config import PRESETS

    hf = GptOssExperts(HFConfig(**PRESETS["tiny"].to_hf_dict(quantized=False)))
    v = np.concatenate([np.linspace(-20, 20, 401), [-7, 7, -7.0001, 7.0001, 6.9999, 0]]).astype(np.float32)
    gate_up = np.stack(np.meshgrid(v, v), -1).reshape(-1, 2 * 1)  # every (gate, up) pair, interleaved
    ref = hf._apply_gate(torch.from_numpy(gate_up)).numpy()
    ours = np.asarray(swiglu(jnp.asarray(gate_up), 1.702, 7.0))
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-6)
    # gate has no lower clamp: a very negative gate still shapes the output
    assert ours[0, 0] != np.asarray(swiglu(jnp.asarray([[-7.0, -20.0]]), 1.702, 7.0))[0, 0]


@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
@pytest.mark.parametrize("path", ["gather", "grouped"])
def test_unselected_experts_are_never_computed(fmt, path, tiny_model):
    """Poison every expert no token selected with NaN weights: any computation that touches them
    (even multiplied by a zero routing weight, as a dense masked product would) turns the output NaN."""
    rng = np.random.default_rng(0)
    n, k = (3, 4) if path == "gather" else (40, 4)
    ids = np.stack([rng.choice(8, k, replace=False) for _ in range(n)])  # only experts 0..7 are used
    weights = rng.dirichlet(np.ones(k), n).astype(np.float32)
    x = rng.standard_normal((n, 96)).astype(np.float32)
    clean = _experts(tiny_model, 0, fmt)
    poisoned = dict(clean)
    for name in ("gate_up", "down"):
        if fmt == "mxfp4":  # E8M0 scale 0xFF is NaN
            poisoned[f"{name}_scales"] = clean[f"{name}_scales"].at[8:].set(255)
        else:
            poisoned[f"{name}_kernel"] = clean[f"{name}_kernel"].at[8:].set(jnp.nan)
    want = _run(tiny_model, x, ids, weights, clean, path)
    got = _run(tiny_model, x, ids, weights, poisoned, path)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_grouped_and_gather_paths_agree_on_many_tokens(tiny_model):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    mlp = tiny_model.layers[1].mlp
    weights, ids = jax.jit(router, static_argnums=3)(jnp.asarray(x), mlp.router_kernel[...], mlp.router_bias[...], 4)
    experts = _experts(tiny_model, 1, "mxfp4")
    a = _run(tiny_model, x, ids, weights, experts, "gather")
    b = _run(tiny_model, x, ids, weights, experts, "grouped")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_grouped_scan_reuses_each_expert_across_its_blocks():
    """The block-grouped scan decodes an expert at its first block and carries it through the next ones:
    values and gradients (x, LoRA factors) equal the gather path's (each row's own expert, no blocks)
    with an expert spanning several blocks, an empty expert, empty slots (id E) and padding blocks."""
    from tests.test_mxfp4_gmm import _moe_experts

    rng = np.random.default_rng(3)
    experts = _moe_experts(rng, rank=4)  # 4 experts, H 64, I 32
    # 60 tokens x k 2 = 120 rows (blocks of 32): expert 1 takes 60 rows (2 blocks), expert 0 none
    ids = np.stack([np.ones(60, np.int64), rng.choice([2, 3, 4], 60)], axis=1)
    ids = jnp.asarray(rng.permuted(ids, axis=1), jnp.int32)
    x = jnp.asarray(rng.standard_normal((60, 64)) * 0.05, jnp.float32)
    weights = jax.nn.softmax(jnp.asarray(rng.standard_normal(ids.shape), jnp.float32), -1)
    lora = {k: v for k, v in experts.items() if "_lora_" in k}

    def loss(x, lora, path):
        y = experts_forward(x, ids, weights, {**experts, **lora}, 4, 1.702, 7.0, path, kernel="off")
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    grad = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=2)  # one compile, not op by op
    (_, y_ref), g_ref = grad(x, lora, "gather")
    (_, y), g = grad(x, lora, "grouped")
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-5 * float(jnp.abs(y_ref).max()))
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    assert float(jnp.abs(y_ref).max()) > 0
