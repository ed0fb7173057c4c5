"""Full-model parity with transformers' GptOss, padding, KV-cache consistency, real-size shapes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from gptoss_jax.config import PRESETS
from gptoss_jax.checkpoint.shapes import abstract_model, flat_paths
from tests.reference import reference_logits


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    # 48 tokens = 6x the tiny window of 8: every sliding layer crosses its window boundary
    return np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, (2, 48))


@pytest.fixture(scope="module")
def ref_logits(hf_reference, tokens):
    return reference_logits(hf_reference, tokens)


@pytest.mark.parametrize("layout", ["transformers", "original"])
@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_fp32_logits_match_transformers(layout, experts, tiny_hf, tiny_original, tokens, ref_logits):
    path = tiny_hf if layout == "transformers" else tiny_original
    model = gptoss_jax.load(path, dtype=jnp.float32, experts=experts)
    ours = np.asarray(model.logits(tokens))
    assert ours.shape == ref_logits.shape and ours.dtype == np.float32
    err = np.abs(ours - ref_logits).max()
    print(f"fp32 {layout}/{experts}: max abs logit error {err:.3g} (logit scale {np.abs(ref_logits).max():.3g})")
    assert err <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_row_alone(side, tiny_hf, hf_reference, tiny_cfg):
    rng = np.random.default_rng(3)
    lengths = [48, 29, 11]
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    rows = [rng.integers(0, tiny_cfg.vocab_size, n) for n in lengths]
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(t - len(r), t)
        tokens[i, sl], mask[i, sl] = r, 1
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    ours = np.asarray(model.logits(tokens, mask))
    for i, r in enumerate(rows):
        alone = reference_logits(hf_reference, r[None])[0]
        got = ours[i][mask[i].astype(bool)]
        assert np.abs(got - alone).max() <= 1e-4, f"row {i} ({side} padding)"


@pytest.mark.slow
def test_bf16_tracks_reference_as_well_as_transformers_bf16(tiny_hf, hf_reference, tiny_cfg):
    """On the random tiny model, bf16 (weights and activations) stays as close to the fp32 reference
    as transformers' own bf16 run (RMS logit error, top-1 agreement)."""
    import torch
    from tests.reference import load_reference

    tokens = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, (8, 64))
    ref = reference_logits(hf_reference, tokens)
    hf_bf16 = reference_logits(load_reference(tiny_hf, torch.bfloat16), tokens)
    ours = np.asarray(gptoss_jax.load(tiny_hf, dtype=jnp.bfloat16).logits(tokens))
    rms = lambda a: float(np.sqrt(np.mean((a - ref) ** 2)))  # noqa: E731
    top1 = lambda a: float((a.argmax(-1) == ref.argmax(-1)).mean())  # noqa: E731
    print(f"bf16 RMS logit error: ours {rms(ours):.4f}, transformers {rms(hf_bf16):.4f}; top-1 agreement: "
          f"ours {top1(ours):.4f}, transformers {top1(hf_bf16):.4f}")
    assert rms(ours) <= 1.1 * rms(hf_bf16)
    assert top1(ours) >= top1(hf_bf16) - 0.01


def test_bf16_top1_agreement_on_a_confident_model(tmp_path, tiny_cfg):
    """>= 99% top-1 agreement with the fp32 reference where the model is confident (an lm_head aligned
    with the embeddings gives trained-like logit margins; random heads leave near-ties)."""
    from convert.synthetic import write_random_checkpoint
    from tests.reference import load_reference

    path = write_random_checkpoint(tmp_path / "ck", tiny_cfg, seed=5, lm_head_alignment=1.0)
    tokens = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, (8, 64))
    ref = reference_logits(load_reference(path), tokens)
    ours = np.asarray(gptoss_jax.load(path, dtype=jnp.bfloat16).logits(tokens))
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"bf16 top-1 agreement {agree:.4f} over {agree.size if hasattr(agree, 'size') else tokens.size} positions")
    assert agree >= 0.99


def test_layouts_load_identical_parameters(tiny_hf, tiny_original):
    a = nnx.state(gptoss_jax.load(tiny_hf, dtype=jnp.float32))
    b = nnx.state(gptoss_jax.load(tiny_original, dtype=jnp.float32))
    fa, fb = flat_paths(a), flat_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k][...]), np.asarray(fb[k][...]), err_msg=k)


def test_cached_decode_equals_full_forward(tiny_hf, tokens):
    """Prefill in chunks, then one token at a time; sliding layers use an 8-slot ring buffer."""
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    full = np.asarray(model.logits(tokens))
    b, t = tokens.shape
    cache = model.init_cache(b, context=64)
    assert cache[0].pos.shape[1] == 8 and cache[1].pos.shape[1] == 64  # sliding ring vs full context
    step = nnx.jit(lambda m, tok, pos, c: m(tok, pos, c))
    out = []
    for start, stop in [(0, 13), *((i, i + 1) for i in range(13, t))]:
        pos = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (b, stop - start))
        logits, cache = step(model, jnp.asarray(tokens[:, start:stop], jnp.int32), pos, cache)
        out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name, params, nbytes", [
    ("gpt-oss-20b", 20_914_757_184, 13_761_264_768),
    ("gpt-oss-120b", 116_829_156_672, 65_248_815_744),
])
@pytest.mark.slow
def test_real_presets_parameter_count_and_packed_bytes(name, params, nbytes):
    """eval_shape only: 4-bit values count as parameters (2 per byte), E8M0 scales do not.
    Bytes with bf16 dense weights equal the official checkpoints' total_size."""
    flat = flat_paths(nnx.state(abstract_model(PRESETS[name], jnp.bfloat16, "mxfp4")))
    count = sum(int(np.prod(v.shape)) * (2 if k.endswith("_blocks") else 1)
                for k, v in flat.items() if not k.endswith("_scales"))
    size = sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in flat.values())
    assert count == params
    assert size == nbytes
    experts = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.endswith(("_blocks", "_scales")))
    dense_experts = sum(int(np.prod(v.shape)) for k, v in flat.items() if k.endswith("_blocks")) * 2
    assert experts * 8 / dense_experts == pytest.approx(4.25)  # bits per expert parameter


def test_logits_rejects_bad_token_shapes(tiny_hf):
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    with pytest.raises(ValueError, match="batch, time"):
        model.logits(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="mask shape"):
        model.logits(np.zeros((2, 5), np.int32), np.ones((2, 4)))
