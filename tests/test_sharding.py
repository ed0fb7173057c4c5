"""Meshes, rule presets, the expert-parallel MoE: sharded equals single-device, memory per device.

Runs on the 8 fake CPU devices that conftest.py sets up (XLA_FLAGS) before JAX starts.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import NamedSharding, PartitionSpec as P

import gptoss_jax
from gptoss_jax.config import PRESETS
from gptoss_jax.layers.kv_cache import init_cache
from gptoss_jax.checkpoint.shapes import abstract_model, flat_paths
from gptoss_jax.model import GptOss
from gptoss_jax.sharding import (Layout, add_mesh_arguments, bytes_per_device, cache_shardings, mesh_from_args,
                                 mesh_from_spec, parse_mesh_spec, shard_model, state_shardings, tree_shardings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: data x expert x model meshes and the rule preset that uses every axis of each
MESHES = [("expert=8", "expert"), ("data=2,expert=4", "expert"), ("expert=4,model=2", "expert_tensor"),
          ("data=8", "fsdp")]


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() < 8:
        pytest.fail(f"need 8 devices, have {jax.device_count()}: XLA_FLAGS must hold "
                    f"--xla_force_host_platform_device_count=8 before JAX starts (tests/conftest.py)")


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(7).integers(0, tiny_cfg.vocab_size, (8, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def single_logits(tiny_model, tokens):
    return np.asarray(tiny_model.logits(tokens))


def test_mesh_spec():
    assert parse_mesh_spec("data=2,expert=4", 8) == {"data": 2, "expert": 4, "model": 1}
    assert parse_mesh_spec(" model=2 , expert=-1", 8) == {"data": 1, "expert": 4, "model": 2}
    assert parse_mesh_spec("", 8) == {"data": 1, "expert": 1, "model": 1}
    for bad, message in [("data=2,pipe=4", "'pipe=4' is not AXIS=SIZE"), ("data=two", "'two' of axis 'data'"),
                         ("data=0", "size 0"), ("data=2,data=4", "given twice"), ("data=-1,expert=-1", "only one"),
                         ("expert=16", "needs 16 devices, only 8"), ("data=3,expert=-1", "do not split")]:
        with pytest.raises(ValueError, match=message):
            parse_mesh_spec(bad, 8)
    mesh = mesh_from_spec("data=2,expert=4")
    assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1} and mesh.size == 8
    assert dict(mesh_from_spec(None).shape) == {"data": 8, "expert": 1, "model": 1}
    assert mesh_from_spec("expert=2").devices.size == 2  # fewer than all devices: the first ones


def test_mesh_arguments():
    parser = add_mesh_arguments(argparse.ArgumentParser())
    assert mesh_from_args(parser.parse_args([])) is None
    args = parser.parse_args(["--mesh", "expert=4,model=2", "--rules", "expert_tensor"])
    assert dict(mesh_from_args(args).shape) == {"data": 1, "expert": 4, "model": 2} and args.rules == "expert_tensor"
    with pytest.raises(SystemExit):
        parser.parse_args(["--rules", "nonsense"])


@pytest.mark.parametrize("spec, rules", MESHES)
def test_sharded_forward_equals_single_device(spec, rules, tiny_hf, tokens, single_logits):
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32, mesh=mesh_from_spec(spec), rules=rules)
    err = np.abs(np.asarray(model.logits(tokens)) - single_logits).max()
    print(f"{spec} {rules}: max abs logit difference {err:.3g}")
    assert err <= 1e-5


@pytest.mark.slow
def test_bf16_sharded_tracks_float32_as_well_as_one_device(tiny_hf, tiny_cfg, tiny_model):
    """In bf16 each device rounds its partial expert sum before the reduction; the logits stay as close
    to the float32 model as one device's bf16 logits."""
    tokens = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, (8, 48))
    ref = np.asarray(tiny_model.logits(tokens))
    one = np.asarray(gptoss_jax.load(tiny_hf, dtype=jnp.bfloat16).logits(tokens))
    sharded = np.asarray(gptoss_jax.load(tiny_hf, dtype=jnp.bfloat16, mesh=mesh_from_spec("expert=8"),
                                         rules="expert").logits(tokens))
    rms = lambda a: float(np.sqrt(np.mean((a - ref) ** 2)))  # noqa: E731
    print(f"bf16 RMS logit error against float32: one device {rms(one):.4f}, expert=8 {rms(sharded):.4f}")
    assert rms(sharded) <= 1.1 * rms(one)


@pytest.mark.slow
@pytest.mark.parametrize("experts, scheme", [("dense", "reduce"), ("mxfp4", "all_to_all")])
def test_dense_experts_and_all_to_all(experts, scheme, tiny_hf, tokens, single_logits):
    mesh = mesh_from_spec("data=2,expert=4")
    model = shard_model(gptoss_jax.load(tiny_hf, dtype=jnp.float32, experts=experts), mesh, "expert",
                        moe_scheme=scheme)
    assert np.abs(np.asarray(model.logits(tokens)) - single_logits).max() <= 1e-5


def _decode(model, tokens, prompt=5):
    """Prefill ``prompt`` tokens, then one token per step -> logits [B, T, V] and the final cache."""
    b, t = tokens.shape
    cache = model.init_cache(b, context=16)
    step = nnx.jit(lambda m, tok, pos, c: m(tok, pos, c))
    out = []
    for start, stop in [(0, prompt), *((i, i + 1) for i in range(prompt, t))]:
        pos = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (b, stop - start))
        logits, cache = step(model, jnp.asarray(tokens[:, start:stop]), pos, cache)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1), cache


@pytest.fixture(scope="module")
def single_decode(tiny_model, tokens):
    return _decode(tiny_model, tokens[:2])[0]


@pytest.mark.parametrize("spec, rules, cache_spec", [
    ("data=2,expert=4", "expert", ("data", None, None, None)),  # 1 token per data shard: the gather path
    ("expert=4,model=2", "expert_tensor", (None, "model", None, None)),  # kv heads over model
])
@pytest.mark.slow
def test_sharded_decode_equals_unsharded(spec, rules, cache_spec, tiny_hf, single_decode, tokens):
    mesh = mesh_from_spec(spec)
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32, mesh=mesh, rules=rules)
    assert model.init_cache(2, 16)[1].k.sharding.is_equivalent_to(NamedSharding(mesh, P(*cache_spec)), 4)
    got, cache = _decode(model, tokens[:2])
    assert np.abs(got - single_decode).max() <= 1e-5
    # the cache keeps its placement from step to step (no resharding in a decode loop)
    for c, s in zip(cache, cache_shardings(cache, mesh, rules)):
        assert all(a.sharding.is_equivalent_to(b, a.ndim) for a, b in zip(c, s))


@pytest.mark.slow
def test_engine_on_a_mesh_generates_what_one_device_does(tiny_hf, tiny_model):
    """The decoding engine (what generate/chat/serve --mesh run) on an expert x model mesh: its caches
    are created in their shards (slots over the expert axis, kv heads over model), two short prompts
    share one prefill call on the sharded cache, and its greedy completions equal the single-device
    engine's."""
    from gptoss_jax.decode import Engine, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=())
    prompts = [[5, 9, 11, 300], [100, 200], list(range(3, 22)), [7], [42, 43, 44]]  # 5 requests for 4 slots
    sharded = gptoss_jax.load(tiny_hf, dtype=jnp.float32, mesh=mesh_from_spec("expert=4,model=2"))
    outs = []
    for model in (tiny_model, sharded):
        engine = Engine(model, max_batch=4, context=32, prefill_chunk=32)
        outs.append(engine.generate(prompts, greedy))
        assert engine.stats["prefill_calls"] < engine.stats["prefill_chunks"]  # chunks shared a call
        if model is sharded:
            k = engine.runner.state.cache[1].k
            assert len(k.sharding.device_set) == 8 and k.addressable_shards[0].data.shape[:2] == (1, 1)
    assert outs[0] == outs[1]


def _expert_leaves(state) -> dict[str, jax.Array | jax.ShapeDtypeStruct]:
    """Parameters whose leading logical axis is ``experts`` (packed or dense weights, biases)."""
    return {k: v.get_value() for k, v in flat_paths(state).items()
            if (v.get_metadata().get("out_sharding") or (None,))[0] == "experts"}


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
@pytest.mark.parametrize("spec, rules", [("expert=8", "expert"), ("expert=4,model=2", "expert_tensor")])
def test_expert_bytes_per_device(experts, spec, rules, tiny_hf, tiny_cfg):
    model = gptoss_jax.load(tiny_hf, dtype=jnp.bfloat16, experts=experts, mesh=mesh_from_spec(spec), rules=rules)
    leaves = _expert_leaves(nnx.state(model))
    assert len(leaves) == tiny_cfg.num_hidden_layers * (6 if experts == "mxfp4" else 4)
    total = sum(a.nbytes for a in leaves.values())
    per_device = {d: 0 for d in jax.devices()}
    for a in leaves.values():
        for shard in a.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert set(per_device.values()) == {total // 8}, (total, per_device)


def _eqns(jaxpr, inside=False):
    """(eqn, inside a shard_map body) for every equation, recursively."""
    for e in jaxpr.eqns:
        yield e, inside
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    yield from _eqns(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub,
                                     inside or e.primitive.name == "shard_map")


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
@pytest.mark.parametrize("batch, path", [(8, "grouped"), (1, "gather")])
def test_expert_weights_stay_in_the_shard_map_body(experts, batch, path, tiny_hf, tiny_cfg):
    """Nothing outside the shard_map bodies touches expert weights; each body receives E/n experts,
    never moves them (no collective on them) and reads them itself."""
    e, n = tiny_cfg.num_experts, 4
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32, experts=experts, mesh=mesh_from_spec("expert=4"),
                            rules="expert")
    full = {a.shape for a in _expert_leaves(nnx.state(model)).values()}
    local = {(e // n, *s[1:]) for s in full}
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state).jaxpr
    collectives = {"all_gather", "all_to_all", "ppermute", "psum", "psum_scatter", "reduce_scatter", "psum_invariant"}
    bodies, reads, names = 0, 0, set()
    for eq, inside in _eqns(jaxpr):
        shapes = {v.aval.shape for v in eq.invars if hasattr(v, "aval")}
        name = eq.primitive.name
        names.add((name, inside))
        if name == "shard_map":
            bodies += 1
            for outer, inner in zip(eq.invars, eq.params["jaxpr"].invars):
                if outer.aval.shape in full:
                    assert inner.aval.shape[0] == e // n, (outer.aval.shape, inner.aval.shape)
        elif not inside:
            assert not shapes & full, f"{name} outside the expert-parallel body uses expert weights"
        if name in collectives:
            assert not shapes & (local | full), f"expert weights moved by {name}"
        reads += name in ("gather", "dynamic_slice") and bool(shapes & local)
    assert bodies == tiny_cfg.num_hidden_layers and reads > 0
    loops = {("scan", True), ("while", True)} & names  # the grouped matmul loops over row blocks (scan or CPU kernel)
    assert bool(loops) == (path == "grouped")


@pytest.mark.parametrize("batch", [1, 16])
def test_no_device_computes_tokens_not_routed_to_it(batch, tiny_model, tiny_cfg):
    """Experts 8..15 (devices 4..7 of expert=8) are poisoned with NaN and no token selects them: any
    computation on them, even for a zero-weighted empty slot, would make the psum NaN."""
    from gptoss_jax.layers.moe import experts_forward
    from gptoss_jax.sharding import expert_parallel_forward

    rng = np.random.default_rng(0)
    k = tiny_cfg.experts_per_token
    ids = jnp.asarray(np.stack([rng.choice(8, k, replace=False) for _ in range(batch)]), jnp.int32)
    weights = jnp.asarray(rng.dirichlet(np.ones(k), batch), jnp.float32)
    x = jnp.asarray(rng.standard_normal((batch, tiny_cfg.hidden_size)), jnp.float32)
    clean = tiny_model.layers[0].mlp.expert_weights()
    poisoned = {**clean, **{f"{n}_scales": clean[f"{n}_scales"].at[8:].set(255) for n in ("gate_up", "down")}}
    args = (tiny_cfg.num_experts, tiny_cfg.swiglu_alpha, tiny_cfg.swiglu_limit)
    want = jax.jit(lambda *a: experts_forward(*a, *args))(x, ids, weights, clean)
    sharded = functools.partial(expert_parallel_forward, mesh=mesh_from_spec("expert=8"), expert_axes=("expert",),
                                token_axes=("expert",) if batch % 8 == 0 else ())
    got = jax.jit(lambda *a: sharded(*a, *args))(x, ids, weights, poisoned)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens, spec, token_axes, expert_axes", [
    (16, "expert=8", ("expert",), ("expert",)),  # tokens split: all-gather + reduce-scatter
    (3, "expert=4,model=2", (), ("expert", "model")),  # tokens replicated: all-reduce
])
@pytest.mark.slow
def test_expert_parallel_gradients(tokens, spec, token_axes, expert_axes, tiny_cfg):
    """Gradients through the expert-parallel MoE (inputs, router weights, dense experts) equal one device's."""
    from gptoss_jax.layers.moe import experts_forward
    from gptoss_jax.sharding import expert_parallel_forward

    rng = np.random.default_rng(1)
    ids = jnp.asarray(np.stack([rng.choice(tiny_cfg.num_experts, 4, replace=False) for _ in range(tokens)]))
    x, w, r = (jnp.asarray(a, jnp.float32) for a in (rng.standard_normal((tokens, tiny_cfg.hidden_size)),
                                                     rng.dirichlet(np.ones(4), tokens),
                                                     rng.standard_normal((tokens, tiny_cfg.hidden_size))))
    e, h, i = tiny_cfg.num_experts, tiny_cfg.hidden_size, tiny_cfg.intermediate_size
    shapes = {"gate_up_kernel": (e, h, 2 * i), "down_kernel": (e, i, h), "gate_up_bias": (e, 2 * i), "down_bias": (e, h)}
    experts = {k: jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for k, s in shapes.items()}
    args = (tiny_cfg.num_experts, tiny_cfg.swiglu_alpha, tiny_cfg.swiglu_limit)
    mesh = mesh_from_spec(spec)

    def loss(forward, x, w, experts):
        return jnp.sum(forward(x, ids, w, experts, *args) * r)

    sharded = functools.partial(expert_parallel_forward, mesh=mesh, expert_axes=expert_axes, token_axes=token_axes)
    want, got = (jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1, 2)))(x, w, experts)
                 for f in (experts_forward, sharded))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_optimizer_state_mirrors_parameters(tiny_cfg):
    """eval_shape only: optax states of nnx params, of plain-array params, and nnx.Optimizer state."""
    mesh = mesh_from_spec("data=2,expert=4")
    params = nnx.state(abstract_model(tiny_cfg, jnp.float32, "dense"), nnx.Param)
    want = jax.tree.leaves(state_shardings(params, mesh, "fsdp"))
    assert any(s.spec != P() for s in want)
    tx = optax.adamw(1e-3)
    for opt_state in (jax.eval_shape(tx.init, params), jax.eval_shape(tx.init, nnx.to_pure_dict(params))):
        shardings = tree_shardings(opt_state, mesh, "fsdp", params=params)
        assert jax.tree.leaves(shardings[0].mu) == want and jax.tree.leaves(shardings[0].nu) == want
        assert shardings[0].count.spec == P()
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(GptOss(tiny_cfg, dtype=jnp.float32, experts="dense"), tx,
                                                     wrt=nnx.Param))
    mu = state_shardings(nnx.state(optimizer), mesh, "fsdp")["opt_state"][0]["mu"]
    assert jax.tree.leaves(mu) == want


@pytest.mark.slow
def test_abstract_memory_fits():
    """eval_shape only. 120b on 8 devices (expert=8, bf16, packed experts) with a 131072-token cache
    fits in 80 GB per device; 20b on one device with packed experts and a 32768-token cache in 16 GB."""
    budget = {"gpt-oss-120b": (mesh_from_spec("expert=8"), 131072, 80e9),
              "gpt-oss-20b": (mesh_from_spec("expert=1"), 32768, 16e9)}
    for name, (mesh, context, limit) in budget.items():
        cfg = PRESETS[name]
        state = nnx.state(abstract_model(cfg, jnp.bfloat16, "mxfp4"))
        layout = Layout(mesh, "expert")
        shardings = state_shardings(state, mesh, layout.rules)
        weights = bytes_per_device(state, shardings)
        cache = jax.eval_shape(lambda: init_cache(cfg, 1, context, jnp.bfloat16))
        cache_bytes = bytes_per_device(cache, layout.cache_shardings(cache))
        experts = _expert_leaves(state)
        expert_total = sum(math.prod(v.shape) * v.dtype.itemsize for v in experts.values())
        flat = flat_paths(shardings)
        expert_device = bytes_per_device(experts, {k: flat[k] for k in experts})
        print(f"{name} on {mesh.size} device(s): weights {weights / 1e9:.2f} GB/device (experts {expert_device / 1e9:.2f} "
              f"of {expert_total / 1e9:.2f}), {context}-token cache {cache_bytes / 1e9:.2f} GB; total "
              f"{(weights + cache_bytes) / 1e9:.2f} GB of {limit / 1e9:.0f}")
        assert expert_device * mesh.size == expert_total
        assert weights + cache_bytes <= limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_loopback(tiny_hf, tokens, single_logits, tmp_path):
    """Two processes x 4 CPU devices form one 8-device mesh (data=2, expert=4) and compute the same logits."""
    np.save(tmp_path / "tokens.npy", tokens)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "tests.multihost_worker", "--ckpt", str(tiny_hf), "--tokens",
           str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "logits.npy"), "--mesh", "data=2,expert=4",
           "--rules", "expert", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    assert np.abs(np.load(tmp_path / "logits.npy") - single_logits).max() <= 1e-5
