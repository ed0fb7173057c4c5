"""Our folder (or a model) -> the official transformers layout: byte-identical tensors, transformers loads it."""
from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax
from convert import CheckpointError, convert_checkpoint, export_official
from gptoss_jax.checkpoint.official import INDEX, open_checkpoint
from gptoss_jax.mxfp4 import unpack_np
from tests.reference import load_reference, reference_logits

SHARD = 300_000


def tensors(folder) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of an official folder: name -> (safetensors dtype, shape, raw bytes)."""
    ckpt = open_checkpoint(folder)
    return {n: (f.info[n][0], f.info[n][1], ckpt.read(n).tobytes()) for n, f in ckpt.files.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_converted):
    return export_official(tiny_converted, tmp_path_factory.mktemp("export") / "hf", max_shard_bytes=SHARD,
                           progress=False)


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(11).integers(0, tiny_cfg.vocab_size, (2, 24))


def test_round_trip_is_byte_identical(tiny_hf, exported):
    assert tensors(exported) == tensors(tiny_hf)


def test_round_trip_from_original_layout(tmp_path, tiny_hf, tiny_original):
    """original/ -> ours -> transformers layout equals the transformers-layout checkpoint of the same model."""
    ours = convert_checkpoint(tiny_original, tmp_path / "ours", dtype="float32", progress=False)
    assert tensors(export_official(ours, tmp_path / "hf", progress=False)) == tensors(tiny_hf)


def test_exported_folder_layout(tiny_hf, exported, tiny_cfg):
    files = sorted(os.listdir(exported))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    for k, name in enumerate(shards):  # 0-based, the last index in every name
        assert name == f"model-{k:05d}-of-{len(shards) - 1:05d}.safetensors"
    assert set(files) == {*shards, INDEX, "config.json", "generation_config.json"}
    index = json.load(open(os.path.join(exported, INDEX)))
    sizes = {n: len(b) for n, (_, _, b) in tensors(exported).items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert set(index["weight_map"]) == set(sizes) and set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        in_shard = [sizes[n] for n, f in index["weight_map"].items() if f == shard]
        assert sum(in_shard) <= SHARD or len(in_shard) == 1
    assert json.load(open(os.path.join(exported, "config.json"))) == json.loads(json.dumps(
        open_checkpoint(tiny_hf).config.to_hf_dict()))
    assert open(os.path.join(exported, "generation_config.json")).read() == \
        open(os.path.join(tiny_hf, "generation_config.json")).read()


def test_transformers_loads_the_export(exported, hf_reference, tokens):
    ours = reference_logits(load_reference(exported), tokens)
    np.testing.assert_array_equal(ours, reference_logits(hf_reference, tokens))


def _assert_same_model(exported, original):
    """Same tensors, except that re-quantized experts may encode the same values differently."""
    a, b = open_checkpoint(exported), open_checkpoint(original)
    assert set(a.files) == set(b.files)
    for name in a.files:
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            scales = name.replace("_blocks", "_scales")
            np.testing.assert_array_equal(unpack_np(a.read(name), a.read(scales)),
                                          unpack_np(b.read(name), b.read(scales)), err_msg=name)
        else:
            assert a.read(name).tobytes() == b.read(name).tobytes(), name


def test_dense_experts_are_requantized(tmp_path, tiny_hf, hf_reference, tokens):
    ours = convert_checkpoint(tiny_hf, tmp_path / "dense", experts="bf16", progress=False)
    out = export_official(ours, tmp_path / "hf", progress=False)
    _assert_same_model(out, tiny_hf)
    np.testing.assert_array_equal(reference_logits(load_reference(out), tokens),
                                  reference_logits(hf_reference, tokens))


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_export_in_memory_model(experts, tmp_path, tiny_hf, tiny_converted):
    """A model (e.g. after fine-tuning) exports directly; float32 weights go back to bf16 exactly here."""
    model = gptoss_jax.load(tiny_converted, dtype=jnp.float32, experts=experts)
    out = export_official(model, tmp_path / "hf", progress=False)
    if experts == "mxfp4":
        assert tensors(out) == tensors(tiny_hf)
    else:
        _assert_same_model(out, tiny_hf)
    assert not re.search(r"tokenizer|generation", " ".join(os.listdir(out)))  # a model carries no files


def test_export_errors(tmp_path, tiny_hf, exported):
    with pytest.raises(CheckpointError, match="not a gptoss-jax checkpoint"):
        export_official(tmp_path, tmp_path / "out")  # a plain folder
    with pytest.raises(FileExistsError, match="already exists"):
        export_official(tiny_hf, exported)
    assert not os.path.exists(tmp_path / "out")
