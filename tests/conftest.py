"""Shared fixtures: tiny random checkpoints in both official layouts (same seed = same model) and
the transformers reference loaded from them."""
from __future__ import annotations

import os

import pytest

from convert.synthetic import write_random_checkpoint
from gptoss_jax.config import PRESETS

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
SEED = 1


@pytest.fixture(scope="session")
def tiny_cfg():
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_cfg):
    """Transformers layout, MXFP4 experts, split into 0-based shards with an index."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_hf"), tiny_cfg, layout="transformers",
                                   seed=SEED, max_shard_bytes=300_000)


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory, tiny_cfg):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny_original"), tiny_cfg, layout="original", seed=SEED)


@pytest.fixture(scope="session")
def hf_reference(tiny_hf):
    from tests.reference import load_reference

    return load_reference(tiny_hf)


@pytest.fixture(scope="session")
def o200k_path():
    """The real o200k_base vocabulary shipped beside the repository (../shared/data)."""
    path = os.path.normpath(os.path.join(SHARED, "data", "o200k_base.tiktoken"))
    if not os.path.isfile(path):
        pytest.fail(f"missing {path}: the shared data folder must sit beside the repository")
    return path


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory, tiny_hf):
    """tiny_hf converted to our Orbax format (MXFP4 experts packed, bf16 weights)."""
    from convert import convert_checkpoint

    return convert_checkpoint(tiny_hf, tmp_path_factory.mktemp("tiny_converted") / "ckpt", progress=False)
