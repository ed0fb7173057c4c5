"""Config presets and both official config.json variants."""
from __future__ import annotations

import itertools
import json

import pytest
from transformers import GptOssConfig as HFConfig

from gptoss_jax.config import PRESETS, ConfigError, GptOssConfig, read_config_file

# original/config.json of gpt-oss-20b, as published (reference ModelConfig keys)
ORIGINAL_20B = {"num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
                "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
                "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
                "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


def test_tiny_dimensions_are_pairwise_distinct():
    c = PRESETS["tiny"]
    dims = {"hidden": c.hidden_size, "intermediate": c.intermediate_size, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim, "experts": c.num_experts, "vocab": c.vocab_size,
            "q_size": c.q_size, "kv_size": c.kv_size, "window": c.sliding_window, "layers": c.num_hidden_layers}
    for (a, x), (b, y) in itertools.combinations(dims.items(), 2):
        assert x != y, f"{a} == {b} == {x}"
    assert c.experts_per_token < c.num_experts


def test_original_config_reads_with_the_alpha_beta_swap():
    cfg = GptOssConfig.from_original_dict(ORIGINAL_20B)
    assert cfg == PRESETS["gpt-oss-20b"]
    swapped = GptOssConfig.from_original_dict({**ORIGINAL_20B, "rope_ntk_alpha": 2.0})
    assert swapped.rope_ntk_alpha == 2.0 and swapped.rope_ntk_beta == 32.0
    assert GptOssConfig.from_original_dict(cfg.to_original_dict()) == cfg


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b", "tiny"])
def test_hf_config_round_trips_through_transformers(name):
    cfg = PRESETS[name]
    hf = HFConfig(**cfg.to_hf_dict())  # transformers accepts what we write
    assert hf.num_local_experts == cfg.num_experts and hf.layer_types == list(cfg.layer_types)
    assert hf.max_position_embeddings == cfg.max_position_embeddings
    assert GptOssConfig.from_hf_dict(hf.to_dict()) == cfg
    assert cfg.layer_types[0] == "sliding_attention" and cfg.layer_types[1] == "full_attention"


def test_read_config_file_detects_the_variant(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ORIGINAL_20B))
    (tmp_path / "b.json").write_text(json.dumps(PRESETS["gpt-oss-120b"].to_hf_dict()))
    assert read_config_file(tmp_path / "a.json") == PRESETS["gpt-oss-20b"]
    assert read_config_file(tmp_path / "b.json") == PRESETS["gpt-oss-120b"]


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 100}, "hidden_size"),
    ({"num_key_value_heads": 7}, "num_attention_heads"),
    ({"num_experts_per_tok": 40}, "experts_per_token"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"max_position_embeddings": 8192}, "max_position_embeddings"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                       "original_max_position_embeddings": 4096, "truncate": True}}, "truncate"),
])
def test_bad_hf_config_values_name_the_file_and_field(tmp_path, change, message):
    d = {**PRESETS["gpt-oss-20b"].to_hf_dict(), **change}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message) as e:
        read_config_file(path)
    assert str(path) in str(e.value)


def test_bad_original_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**ORIGINAL_20B, "rope_ntk_gamma": 1}))
    with pytest.raises(ConfigError, match="rope_ntk_gamma"):
        read_config_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(path)
    with pytest.raises(ConfigError, match="unknown preset"):
        from gptoss_jax.config import get_preset
        get_preset("gpt-oss-7b")


def test_field_names_are_the_original_keys():
    """Our config speaks original/config.json: its keys are our field names, read and written as is."""
    cfg = PRESETS["gpt-oss-120b"]
    assert cfg.to_original_dict() == {k: getattr(cfg, k) for k in ORIGINAL_20B}
    assert GptOssConfig.from_original_dict({**ORIGINAL_20B, "num_hidden_layers": 36, "num_experts": 128}) == cfg


def test_our_stored_config_reads_the_names_used_before_the_rename():
    """Folders converted before the fields took the original keys still load (same config)."""
    cfg = PRESETS["tiny"]
    d = cfg.to_dict()
    old = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
           "num_key_value_heads": "num_kv_heads", "rope_ntk_beta": "rope_beta_fast", "rope_ntk_alpha": "rope_beta_slow"}
    assert GptOssConfig.from_dict({old.get(k, k): v for k, v in d.items()}) == cfg
    with pytest.raises(ConfigError, match="num_layerz"):
        GptOssConfig.from_dict({**d, "num_layerz": 3})
