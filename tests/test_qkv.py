"""The fused q/k/v projection (one ``qkv_kernel`` [H, nkv, G+2, D]) against the three separate
projections it replaced: equal q/k/v and logits, the checkpoint tables mapping both official layouts into
it, version-1 Orbax folders (q/k/v stored separately) fused at load, LoRA updates in their slots, and a
clear error for a full fine-tuning state of the old layout."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from convert.orbax_format import GroupWriter
from gptoss_jax.checkpoint import safetensors_file
from gptoss_jax.checkpoint.orbax import MARKER, group_of, read_group, read_marker
from gptoss_jax.checkpoint.shapes import flat_paths
from gptoss_jax.layers.attention import Attention
from gptoss_jax.layers.common import dense, lora_delta
from gptoss_jax.layers.qkv import fuse_qkv, split_qkv
from train import lora

SEPARATE = {"q": "bth,hnd->btnd", "k": "bth,hkd->btkd", "v": "bth,hkd->btkd"}


def separate_qkv(attn: Attention, x, once: bool = False):
    """The previous formulation: the fused weight split into three kernels and biases, three einsums,
    each with its own LoRA update (what ``Attention._project`` computed per projection). ``once`` (a
    barrier in GPU programs, no change of values) is not needed here."""
    kernels, biases = split_qkv(attn.qkv_kernel[...]), split_qkv(attn.qkv_bias[...])
    out = []
    for i, name in enumerate("qkv"):
        lo = attn.lora
        adapter = None if lo is None else getattr(lo, name)
        delta = None if adapter is None else lora_delta(x, adapter.a[...], adapter.b[...] * lo.scale,
                                                        *Attention.LORA_SPECS[name])
        out.append(dense(x, kernels[i], SEPARATE[name], biases[i], delta))
    return tuple(out)


@pytest.fixture
def x(tiny_cfg):
    return jnp.asarray(np.random.default_rng(0).normal(0, 1, (2, 7, tiny_cfg.hidden_size)), jnp.float32)


def test_fuse_and_split_are_inverse_and_keep_each_query_head_with_its_kv_head():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(5, 6, 4)), rng.normal(size=(5, 2, 4)), rng.normal(size=(5, 2, 4))
    fused = fuse_qkv(q, k, v)
    assert fused.shape == (5, 2, 5, 4)
    for h in range(6):  # query head h = g * G + j, G = 3, uses kv head g
        np.testing.assert_array_equal(fused[:, h // 3, h % 3], q[:, h])
    np.testing.assert_array_equal(fused[:, :, 3], k)
    np.testing.assert_array_equal(fused[:, :, 4], v)
    for a, b in zip(split_qkv(fused), (q, k, v)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot fuse"):
        fuse_qkv(rng.normal(size=(5, 5, 4)), k, v)


def test_fused_projection_gives_the_separate_projections_q_k_v(tiny_model, x):
    for layer in (0, 1):
        attn = tiny_model.layers[layer].attn
        got, want = attn.project_qkv(x), separate_qkv(attn, x)
        for name, a, b in zip("qkv", got, want):
            assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32, name
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)


def test_fused_projection_with_lora_adds_each_update_to_its_slots(tiny_hf, tiny_cfg, x):
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    lora.add_lora(model, rank=4, alpha=8.0, targets=("q", "v"), seed=2)  # k without an adapter: zeros there
    rng = np.random.default_rng(1)
    for v in flat_paths(nnx.state(model, nnx.LoRAParam)).values():
        v.set_value(jnp.asarray(rng.normal(0, 0.05, v.shape), jnp.float32))
    attn = model.layers[0].attn
    got, want = attn.project_qkv(x), separate_qkv(attn, x)
    base = separate_qkv(_without_lora(attn), x)
    for name, a, b, c in zip("qkv", got, want, base):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=name)
        moved = np.abs(np.asarray(b) - np.asarray(c)).max()
        assert (moved > 1e-3) == (name != "k"), (name, moved)


def _without_lora(attn):
    class View:
        qkv_kernel, qkv_bias, lora = attn.qkv_kernel, attn.qkv_bias, None
    return View()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_model_logits_equal_the_separate_projections(tiny_hf, tiny_cfg, dtype, monkeypatch):
    """Whole-model logits (prefill and cached decode) with the fused projection against the same model
    running the three separate einsums."""
    model = gptoss_jax.load(tiny_hf, dtype=dtype)
    tokens = np.random.default_rng(3).integers(0, tiny_cfg.vocab_size, (2, 20))
    fused = np.asarray(model.logits(tokens), np.float32)
    monkeypatch.setattr(Attention, "project_qkv", separate_qkv)
    separate = np.asarray(model.logits(tokens), np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(fused, separate, rtol=0, atol=1e-5 * np.abs(separate).max())
    else:  # bf16 activations: the same products and float32 sums, rounded once per projection
        assert np.abs(fused - separate).max() <= 0.02 * np.abs(separate).max()
        assert (fused.argmax(-1) == separate.argmax(-1)).mean() >= 0.95


def test_both_layouts_map_q_k_v_rows_into_the_fused_slots(tiny_hf, tiny_original, tiny_cfg):
    """transformers q_proj/k_proj/v_proj and original/ qkv rows land in the slots fuse_qkv defines."""
    cfg = tiny_cfg
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    files = {}
    for f in os.listdir(tiny_hf):
        if f.endswith(".safetensors"):
            sf = safetensors_file.SafetensorsFile(os.path.join(tiny_hf, f))
            files.update({n: sf for n in sf.info})
    read = lambda n: np.asarray(files[n].read(n), np.float32)  # noqa: E731
    for path in (tiny_hf, tiny_original):
        params = flat_paths(nnx.state(gptoss_jax.load(path, dtype=jnp.float32), nnx.Param))
        w, b = np.asarray(params["layers.1.attn.qkv_kernel"][...]), np.asarray(params["layers.1.attn.qkv_bias"][...])
        assert w.shape == (cfg.hidden_size, nkv, nq // nkv + 2, d) and b.shape == (nkv, nq // nkv + 2, d)
        wq, wk, wv = (read(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv")
        bq = read("model.layers.1.self_attn.q_proj.bias")
        for h in range(nq):
            np.testing.assert_array_equal(w[:, h // (nq // nkv), h % (nq // nkv)], wq[h * d:(h + 1) * d].T)
            np.testing.assert_array_equal(b[h // (nq // nkv), h % (nq // nkv)], bq[h * d:(h + 1) * d])
        for g in range(nkv):
            np.testing.assert_array_equal(w[:, g, -2], wk[g * d:(g + 1) * d].T)
            np.testing.assert_array_equal(w[:, g, -1], wv[g * d:(g + 1) * d].T)


def write_version_1(src, dst) -> None:
    """Rewrite our (version 2) folder ``src`` at ``dst`` as version 1 wrote it: q/k/v kernels and biases
    as separate parameters, format_version 1."""
    marker = read_marker(src)
    writer = GroupWriter(str(dst))
    for group in marker.groups:
        arrays = {}
        for path, a in read_group(marker, group).items():
            head, _, leaf = path.rpartition(".")
            if leaf in ("qkv_kernel", "qkv_bias"):
                suffix = leaf.split("_")[1]
                arrays.update({f"{head}.{p}_{suffix}": np.ascontiguousarray(part)
                               for p, part in zip("qkv", split_qkv(a))})
            else:
                arrays[path] = a
        writer.save(group, arrays)
    writer.close()
    for name in marker.files:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    d = json.load(open(os.path.join(src, MARKER)))
    d["format_version"] = 1
    d["params"] = {p: {"shape": list(s), "dtype": t, "group": group_of(p)} for p, (s, t) in writer.written.items()}
    json.dump(d, open(os.path.join(dst, MARKER), "w"))


@pytest.fixture(scope="module")
def version_1(tmp_path_factory, tiny_converted):
    dst = tmp_path_factory.mktemp("v1") / "ckpt"
    write_version_1(tiny_converted, dst)
    assert "layers.0.attn.q_kernel" in read_marker(dst).params and read_marker(dst).version == 1
    return dst


def test_version_1_folder_is_fused_at_load(version_1, tiny_converted, tiny_cfg):
    mesh = jax.make_mesh((1, 1), ("model", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    tokens = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, (1, 9))
    want = gptoss_jax.load(tiny_converted, dtype=jnp.float32)
    ref = flat_paths(nnx.state(want, nnx.Param))
    for kw in ({}, {"mesh": mesh}, {"experts": "dense"}):  # host path, sharded restore, expert conversion
        got = gptoss_jax.load(version_1, dtype=jnp.float32, **kw)
        params = flat_paths(nnx.state(got, nnx.Param))
        for k in ("layers.0.attn.qkv_kernel", "layers.2.attn.qkv_bias", "layers.1.attn.o_kernel"):
            np.testing.assert_array_equal(np.asarray(params[k][...]), np.asarray(ref[k][...]), err_msg=k)
        if not kw:
            np.testing.assert_array_equal(np.asarray(got.logits(tokens)), np.asarray(want.logits(tokens)))


def test_version_1_folder_exports_the_same_official_tensors(tmp_path, version_1, tiny_converted):
    from convert import export_official

    a = export_official(version_1, tmp_path / "a", progress=False)
    b = export_official(tiny_converted, tmp_path / "b", progress=False)
    for name in sorted(os.listdir(b)):
        if name.endswith(".safetensors"):
            assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


def test_full_training_state_of_separate_qkv_gives_a_clear_error(tmp_path):
    from train.checkpointing import Checkpoints

    ckpts = Checkpoints(tmp_path / "ck")
    old = {"layers.0.attn.q_kernel": jnp.zeros((2, 3)), "layers.0.attn.k_kernel": jnp.zeros((2, 1))}
    ckpts.save(1, old, {"mu": old}, {"step": 1})
    ckpts.wait()
    ckpts.close()
    ckpts = Checkpoints(tmp_path / "ck")  # as a resumed run opens it: no handlers registered yet
    new = {"layers.0.attn.qkv_kernel": jnp.zeros((2, 1, 5))}
    with pytest.raises(ValueError, match="written before each layer's q/k/v projections were fused"):
        ckpts.restore(1, new, {"mu": new})
    with pytest.raises(ValueError, match="not this run's"):
        ckpts.restore(1, {**old, "layers.0.mlp.x": jnp.zeros(2)}, None)
    ckpts.close()


def test_one_row_fused_projection_keeps_the_gpu_padding_rule():
    """The fused weight goes through ``layers.common.matmul``: in a program for the GPU a one-row
    projection whose fused weight has GPU_PAD_MIN..GPU_SMALL_DOT elements gets the zero row (same
    values); the real models' fused weights (2880 x 8 x 10 x 64 = 14.7M elements) are GEMMs as they are."""
    import dataclasses

    from gptoss_jax import platform
    from gptoss_jax.config import PRESETS
    from gptoss_jax.layers.common import GPU_PAD_MIN, GPU_SMALL_DOT

    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        c = PRESETS[name]
        assert c.hidden_size * (c.q_size + 2 * c.kv_size) >= GPU_SMALL_DOT, name
    cfg = dataclasses.replace(PRESETS["tiny"], hidden_size=2048, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=64)
    attn = Attention(cfg, 0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert GPU_PAD_MIN <= attn.qkv_kernel.size < GPU_SMALL_DOT
    rng = np.random.default_rng(5)  # small integers: every product and sum exact, in any order
    for p in (attn.qkv_kernel, attn.qkv_bias):
        p.set_value(jnp.asarray(rng.integers(-3, 4, p.shape), jnp.float32))
    x = jnp.asarray(rng.integers(-3, 4, (1, 1, 2048)), jnp.float32)

    def run(target):
        def f(x):
            with platform.lowering_for(target):
                return attn.project_qkv(x)
        return str(jax.make_jaxpr(f)(x)), jax.jit(f)(x)

    jaxpr, got = run("gpu")
    assert "concatenate" in jaxpr and "concatenate" not in run("tpu")[0]
    for name, a, b in zip("qkv", got, separate_qkv(attn, x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
