"""Loading official folders: layout detection and clear errors for bad input."""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from gptoss_jax.checkpoint import safetensors_file
from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.official import detect_layout
from convert.synthetic import write_random_checkpoint


@pytest.fixture
def ck(tmp_path, tiny_hf):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_hf, dst)
    return dst


def _shard_of(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name], index


def _rewrite(path, edit):
    f = safetensors_file.SafetensorsFile(path)
    tensors = {n: f.read(n) for n in f.names()}
    edit(tensors)
    safetensors_file.write(path, tensors, {"format": "pt"})


def _expect(folder, *fragments):
    with pytest.raises(CheckpointError) as e:
        gptoss_jax.load(folder, dtype=jnp.float32)
    for frag in fragments:
        assert str(frag) in str(e.value), str(e.value)


def test_missing_tensor(ck):
    name = "model.layers.1.self_attn.sinks"
    shard, index = _shard_of(ck, name)
    _rewrite(shard, lambda t: t.pop(name))
    del index["weight_map"][name]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(ck, "missing tensor", name, "config.json")


def test_unexpected_tensor(ck):
    shard, _ = _shard_of(ck, "lm_head.weight")
    _rewrite(shard, lambda t: t.update({"model.layers.9.extra": np.zeros(3, np.float32)}))
    _expect(ck, "model.layers.9.extra")  # the index does not list it, or it is not a gpt-oss tensor


def test_unexpected_tensor_listed_in_index(ck):
    shard, index = _shard_of(ck, "lm_head.weight")
    _rewrite(shard, lambda t: t.update({"model.layers.9.extra": np.zeros(3, np.float32)}))
    index["weight_map"]["model.layers.9.extra"] = shard.name
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(ck, "unexpected tensor", "model.layers.9.extra", shard.name)


def test_wrong_shape(ck):
    name = "model.layers.0.self_attn.q_proj.weight"
    shard, _ = _shard_of(ck, name)
    _rewrite(shard, lambda t: t.update({name: t[name][:-1]}))
    _expect(ck, name, "[119, 96]", "expected [120, 96]", shard.name)


def test_wrong_dtype(ck):
    name = "model.layers.2.mlp.experts.down_proj_scales"
    shard, _ = _shard_of(ck, name)
    _rewrite(shard, lambda t: t.update({name: t[name].astype(np.int64)}))
    _expect(ck, name, "dtype I64", "expected U8")


def test_truncated_shard(ck):
    shard, _ = _shard_of(ck, "lm_head.weight")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    _expect(ck, shard.name, "truncated")


def test_index_names_a_missing_file(ck):
    shard, _ = _shard_of(ck, "lm_head.weight")
    os.remove(shard)
    _expect(ck, shard.name, "does not exist")


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _expect(tmp_path, "unknown layout")
    with pytest.raises(CheckpointError, match="not a folder"):
        gptoss_jax.load(tmp_path / "nope")


def test_bad_config_value(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_local_experts"] = 12  # tensors hold 16 experts
    (ck / "config.json").write_text(json.dumps(cfg))
    _expect(ck, "model.layers.0.mlp.router.weight", "[16, 96]", "expected [12, 96]")
    cfg["hidden_size"] = 100
    (ck / "config.json").write_text(json.dumps(cfg))
    _expect(ck, "config.json", "hidden_size")


def test_original_dtypes_json_is_checked(tmp_path, tiny_original):
    dst = tmp_path / "orig"
    shutil.copytree(tiny_original, dst)
    dtypes = json.loads((dst / "dtypes.json").read_text())
    dtypes["block.0.mlp.mlp1_weight.blocks"] = "BF16"
    (dst / "dtypes.json").write_text(json.dumps(dtypes))
    _expect(dst, "dtypes.json", "block.0.mlp.mlp1_weight.blocks", "expected FP4")


def test_full_download_prefers_transformers_layout(tmp_path, tiny_hf, tiny_original, tiny_model):
    """The hub folder holds both: the root in transformers layout and original/."""
    root = tmp_path / "gpt-oss"
    shutil.copytree(tiny_hf, root)
    shutil.copytree(tiny_original, root / "original")
    assert detect_layout(root) == ("transformers", str(root))
    assert detect_layout(root, "original") == ("original", str(root / "original"))
    for layout in (None, "original"):
        model = gptoss_jax.load(root, dtype=jnp.float32, layout=layout)
        np.testing.assert_array_equal(np.asarray(model.unembedding[...]), np.asarray(tiny_model.unembedding[...]))


@pytest.mark.slow
def test_dense_expert_checkpoint_loads(tmp_path, tiny_cfg, tiny_hf):
    """transformers-layout checkpoints with dequantized (bf16) experts, as community copies store them."""
    dense = write_random_checkpoint(tmp_path / "dense", tiny_cfg, experts="dense", seed=3)
    model = gptoss_jax.load(dense, dtype=jnp.float32, experts="dense")
    f = safetensors_file.SafetensorsFile(os.path.join(dense, "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.down_kernel[...]),
                                  f.read("model.layers.0.mlp.experts.down_proj").astype(np.float32))
    packed = gptoss_jax.load(dense, dtype=jnp.float32, experts="mxfp4")  # quantized on load (warned)
    assert packed.layers[0].mlp.gate_up_blocks[...].dtype == jnp.uint8
    tokens = np.arange(20)[None]
    a, b = np.asarray(model.logits(tokens)), np.asarray(packed.logits(tokens))
    assert np.abs(a - b).max() < 0.5 * np.abs(a).max()  # lossy, but the same model


def test_loading_keeps_the_stored_expert_format(tmp_path, tiny_cfg, caplog):
    """A folder storing dense experts (a merged LoRA, a community copy) loads dense unless asked otherwise,
    from an official folder and from our converted one; nothing is quantized, nothing warned."""
    from convert import convert_checkpoint

    dense = write_random_checkpoint(tmp_path / "dense", tiny_cfg, experts="dense", seed=3)
    ours = convert_checkpoint(dense, tmp_path / "dense-jax", experts="bf16", progress=False)
    with caplog.at_level("WARNING"):
        for folder in (dense, ours):
            model = gptoss_jax.load(folder, dtype=jnp.float32)
            assert model.expert_format == "dense" and model.layers[0].mlp.down_kernel[...].dtype == jnp.float32
    assert "lossy" not in caplog.text
    with caplog.at_level("WARNING"):
        assert gptoss_jax.load(ours, dtype=jnp.float32, experts="mxfp4").expert_format == "mxfp4"
    assert caplog.text.count("lossy") == 1
