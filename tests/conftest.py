"""Shared fixtures: tiny random checkpoints in both official layouts (same seed = same model) and
the transformers reference loaded from them."""
from __future__ import annotations

import os

# Eight fake CPU devices for the whole session (mesh tests), set before anything imports JAX.
# Single-device code keeps running on device 0.
_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import pytest  # noqa: E402

from convert.synthetic import write_random_checkpoint  # noqa: E402
from gptoss_jax.config import PRESETS  # noqa: E402

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
def tiny_model(tiny_hf):
    """Our float32 model from the same files as ``hf_reference``."""
    import jax.numpy as jnp

    from gptoss_jax import load

    return load(tiny_hf, dtype=jnp.float32)


@pytest.fixture(scope="session")
def reference_run(hf_reference, tiny_cfg):
    """One float32 reference forward over a left-padded batch of 48 tokens (6x the tiny window),
    recording every layer's modules. Returns (tokens, mask, records, positions used by transformers)."""
    import numpy as np

    from tests.reference import capture, reference_logits

    rng = np.random.default_rng(11)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (2, 48))
    mask = np.ones_like(tokens)
    mask[1, :9] = 0  # row 1 is left-padded
    names = ["model.rotary_emb", "model.norm"]
    for i in range(tiny_cfg.num_hidden_layers):
        names += [f"model.layers.{i}.{m}" for m in
                  ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp.router", "mlp.experts")]
    with capture(hf_reference, names) as records:
        reference_logits(hf_reference, tokens, mask)
    positions = np.where(mask == 1, np.arange(tokens.shape[1])[None], -1)  # transformers: 0..T-1, pads masked
    return tokens, mask, records, positions


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory, tiny_hf):
    """tiny_hf converted to our Orbax format (MXFP4 experts packed, bf16 weights)."""
    from convert import convert_checkpoint

    return convert_checkpoint(tiny_hf, tmp_path_factory.mktemp("tiny_converted") / "ckpt", progress=False)


def pytest_collection_modifyitems(items):
    """Tests that talk to a real `gptoss-jax serve` process (the test_server* modules' ``server``
    and ``served`` fixtures, which start one: about 20-60 s a module on 2 cores) are in the slow tier."""
    for item in items:
        if item.module.__name__.split(".")[-1].startswith("test_server") and {"server", "served"} & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def compilations():
    """A list that records every XLA compilation from here to the end of the test: backend compiles and
    hits of a persistent compilation cache, if one is set (JAX_COMPILATION_CACHE_DIR: a program not in the
    in-process cache, found on disk, is a compilation the in-process cache missed all the same)."""
    import jax

    seen = []

    def compiled(event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    def hit(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(compiled)
    jax.monitoring.register_event_listener(hit)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(compiled)
        jax.monitoring.unregister_event_listener(hit)
