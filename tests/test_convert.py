"""Official folder -> our Orbax folder: exact loading, accounting, bad inputs, atomicity, meshes."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax
from convert import CheckpointError, convert_checkpoint, export_official, save_checkpoint
from gptoss_jax.checkpoint import safetensors_file
from gptoss_jax.checkpoint.names import plan
from gptoss_jax.checkpoint.official import INDEX, carried_files, open_checkpoint
from gptoss_jax.checkpoint.orbax import MARKER, PARAMS, read_group, read_marker
from convert.progress import Progress
from convert.to_orbax import check_plan
from gptoss_cli.main import main as gptoss_jax_main
from gptoss_jax.checkpoint.shapes import flat_paths, param_shapes
from gptoss_jax.layers.lora import Adapter, AttentionLoRA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 131072}',
                   "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}"}


def child_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root (its own JAX, its own limits)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=240)


def start_paused(entry: str, ready) -> subprocess.Popen:
    """Run ``entry`` (a line of Python that converts) in a fresh interpreter whose conversion stops for
    good before building layer 1 (the embedding, norm, unembedding and layer 0 are written by then);
    returns once it has paused, signalled by creating the file ``ready``."""
    code = (f"import sys, time, convert, convert.__main__, convert.to_orbax as t\n"
            f"build = t.build_group\n"
            f"def pause_at_layer_1(ckpt, items, *rest):\n"
            f"    if items[0].ours.startswith('layers.1.'):\n"
            f"        open({str(ready)!r}, 'w').close()\n"
            f"        time.sleep(300)\n"
            f"    return build(ckpt, items, *rest)\n"
            f"t.build_group = pause_at_layer_1\n"
            f"{entry}\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=child_env(), stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the converter exited or stalled before pausing: {proc.communicate()}")
        time.sleep(0.1)
    return proc


def same_logits(a_path, b_path, tokens, **kw):
    a = np.asarray(gptoss_jax.load(a_path, **kw).logits(tokens))
    b = np.asarray(gptoss_jax.load(b_path, **kw).logits(tokens))
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(7).integers(0, tiny_cfg.vocab_size, (2, 24))


@pytest.fixture(scope="module")
def original_converted(tmp_path_factory, tiny_original):
    return convert_checkpoint(tiny_original, tmp_path_factory.mktemp("orig_conv") / "ckpt", progress=False)


# ----------------------------------------------------------------------------------- exact loading
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["transformers", "original"])
def test_converted_logits_bit_identical_to_official(layout, dtype, tiny_hf, tiny_original, tiny_converted,
                                                    original_converted, tokens):
    official, ours = (tiny_hf, tiny_converted) if layout == "transformers" else (tiny_original, original_converted)
    same_logits(official, ours, tokens, dtype=dtype)


def test_converted_dense_experts_bit_identical_to_official(tiny_hf, tiny_converted, tokens):
    """Packed experts stored, dense asked for: decoded on device, equal to the host-decoded official load."""
    same_logits(tiny_hf, tiny_converted, tokens, dtype=jnp.float32, experts="dense")


def test_bf16_experts_and_float32_weights(tmp_path, tiny_hf, tokens):
    dst = convert_checkpoint(tiny_hf, tmp_path / "dense", experts="bf16", dtype="float32", progress=False)
    marker = read_marker(dst)
    assert marker.experts == "dense" and marker.dtype == "float32"
    assert marker.params["layers.0.mlp.gate_up_kernel"][1] == "bfloat16"
    assert marker.params["layers.0.attn.qkv_kernel"][1] == "float32"
    for experts in ("dense", "mxfp4"):  # mxfp4 re-quantizes on device: dequantized values are exact
        same_logits(tiny_hf, dst, tokens, dtype=jnp.float32, experts=experts)


def test_converted_folder_contents(tiny_hf, tiny_converted, tiny_cfg):
    marker = json.load(open(os.path.join(tiny_converted, MARKER)))
    assert marker["format"] == "gptoss-jax" and marker["format_version"] == 2
    assert marker["config"] == json.loads(json.dumps(open_checkpoint(tiny_hf).config.to_dict()))
    assert marker["experts"] == "mxfp4" and marker["dtype"] == "bfloat16"
    assert marker["source"]["layout"] == "transformers" and marker["source"]["tensors"] == 60
    assert set(marker["params"]) == set(param_shapes(tiny_cfg))
    assert sorted(os.listdir(os.path.join(tiny_converted, PARAMS))) == sorted(
        ["embedding", "norm", "unembedding", *(f"layers.{i}" for i in range(tiny_cfg.num_hidden_layers))])
    assert marker["files"] == ["generation_config.json"]
    with open(os.path.join(tiny_converted, "generation_config.json")) as a, \
            open(os.path.join(tiny_hf, "generation_config.json")) as b:
        assert a.read() == b.read()
    # MXFP4 stays packed in the Orbax files: the checkpoint's own uint8 bytes
    ckpt = open_checkpoint(tiny_hf)
    layer = read_group(read_marker(tiny_converted), "layers.1")
    for ours, hf in [("gate_up_blocks", "gate_up_proj_blocks"), ("down_scales", "down_proj_scales")]:
        stored = layer[f"layers.1.mlp.{ours}"]
        assert stored.dtype == np.uint8
        np.testing.assert_array_equal(stored, ckpt.read(f"model.layers.1.mlp.experts.{hf}"))


def test_every_source_tensor_read_once(tmp_path, tiny_original, tiny_hf):
    """progress(nbytes) is called once per tensor read: one call per source tensor, bytes = the source total
    (transformers' q_proj, k_proj and v_proj together feed one fused parameter, each read once)."""
    for name, src in (("o", tiny_original), ("t", tiny_hf)):
        calls = []
        convert_checkpoint(src, tmp_path / name, progress=calls.append)
        ckpt = open_checkpoint(src)
        assert len(calls) == len(ckpt.files) and sum(calls) == ckpt.nbytes(), name


def test_plan_accounting_rejects_gaps_and_doubles(tiny_hf, tiny_cfg):
    ckpt = open_checkpoint(tiny_hf)
    items = plan(tiny_cfg, "transformers")
    check_plan(ckpt, items, param_shapes(tiny_cfg))
    with pytest.raises(AssertionError, match="unfilled"):
        check_plan(ckpt, items[:-1], param_shapes(tiny_cfg))
    with pytest.raises(AssertionError, match="filled twice"):
        check_plan(ckpt, items + items[:1], param_shapes(tiny_cfg))
    unused = [it for it in items if it.ours != "layers.2.attn.sinks"]
    with pytest.raises(CheckpointError, match="'model.layers.2.self_attn.sinks' is not used"):
        check_plan(ckpt, unused, {k: v for k, v in param_shapes(tiny_cfg).items() if k != "layers.2.attn.sinks"})


# ----------------------------------------------------------------------------------- bad inputs
def _edit_shard(folder, tensor, change):
    """Rewrite the shard holding ``tensor`` with ``change(dict) -> dict`` and keep the index in step."""
    index_path = os.path.join(folder, INDEX)
    index = json.load(open(index_path))
    fname = index["weight_map"][tensor]
    f = safetensors_file.SafetensorsFile(os.path.join(folder, fname))
    tensors = change({n: f.read(n) for n in f.names()})
    safetensors_file.write(os.path.join(folder, fname), tensors)
    index["weight_map"] = {n: v for n, v in index["weight_map"].items() if v != fname} | {n: fname for n in tensors}
    json.dump(index, open(index_path, "w"))


def _truncate(folder, tensor):
    index = json.load(open(os.path.join(folder, INDEX)))
    path = os.path.join(folder, index["weight_map"][tensor])
    os.truncate(path, os.path.getsize(path) - 100)


def _corrupt_header(folder, tensor):
    index = json.load(open(os.path.join(folder, INDEX)))
    with open(os.path.join(folder, index["weight_map"][tensor]), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")


SINKS = "model.layers.1.self_attn.sinks"
BAD_INPUTS = {
    "missing": (lambda d: _edit_shard(d, SINKS, lambda t: {n: a for n, a in t.items() if n != SINKS}),
                f"missing tensor '{SINKS}'"),
    "extra": (lambda d: _edit_shard(d, SINKS, lambda t: t | {"model.layers.1.mlp.extra": t[SINKS]}),
              "unexpected tensor 'model.layers.1.mlp.extra'"),
    "misshaped": (lambda d: _edit_shard(d, SINKS, lambda t: t | {SINKS: np.concatenate([t[SINKS], t[SINKS]])}),
                  rf"'{SINKS}' has shape \[12\], expected \[6\]"),
    "wrong_dtype": (lambda d: _edit_shard(d, SINKS, lambda t: t | {SINKS: t[SINKS].astype(np.int32)}),
                    f"'{SINKS}' has dtype I32, expected BF16 or F16 or F32"),
    "truncated": (lambda d: _truncate(d, SINKS), "truncated"),
    "corrupt": (lambda d: _corrupt_header(d, SINKS), "corrupt safetensors header"),
    "index_names_missing_file": (lambda d: os.remove(os.path.join(d, json.load(open(os.path.join(d, INDEX)))
                                                                  ["weight_map"][SINKS])), "which does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_clear_error_and_no_output(case, tmp_path, tiny_hf):
    src = shutil.copytree(tiny_hf, tmp_path / "src")
    damage, message = BAD_INPUTS[case]
    damage(src)
    dst = tmp_path / "dst"
    with pytest.raises((CheckpointError, ValueError), match=message):
        convert_checkpoint(src, dst, progress=False)
    assert os.listdir(tmp_path) == ["src"]  # no dst, no temporary folder


def test_original_layout_truncated_file(tmp_path, tiny_original):
    src = shutil.copytree(tiny_original, tmp_path / "src")
    os.truncate(src / "model.safetensors", os.path.getsize(src / "model.safetensors") // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        convert_checkpoint(src, tmp_path / "dst", progress=False)
    assert os.listdir(tmp_path) == ["src"]


def test_not_a_checkpoint_and_already_converted(tmp_path, tiny_converted):
    with pytest.raises(CheckpointError, match="unknown layout"):
        convert_checkpoint(tmp_path, tmp_path / "dst", progress=False)
    with pytest.raises(CheckpointError, match="already a gptoss-jax checkpoint"):
        convert_checkpoint(tiny_converted, tmp_path / "dst", progress=False)
    assert not os.path.exists(tmp_path / "dst")


def test_existing_destination_refused_unless_overwrite(tmp_path, tiny_hf, tiny_original, tokens):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        convert_checkpoint(tiny_hf, dst, progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    convert_checkpoint(tiny_original, dst, overwrite=True, progress=False)
    assert not os.path.exists(dst / "keep.txt")
    same_logits(tiny_hf, dst, tokens, dtype=jnp.float32)
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_disk_full_leaves_nothing(tmp_path, tiny_hf):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the writes fail like a full disk."""
    dst = tmp_path / "dst"
    code = (f"import resource, signal, sys\n"
            f"import convert.__main__ as m, convert.to_orbax, orbax.checkpoint\n"
            f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))\n"
            f"sys.exit(m.main([{str(tiny_hf)!r}, {str(dst)!r}]))\n")
    result = run_python(code)
    assert result.returncode == 1, result.stderr
    assert "error:" in result.stderr and "out of disk space" in result.stderr, result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_killed_midway_leaves_incomplete_temp_and_rerun_succeeds(tmp_path, tiny_hf, tokens):
    dst, ready = tmp_path / "dst", tmp_path / "ready"
    proc = start_paused(f"convert.convert_checkpoint({str(tiny_hf)!r}, {str(dst)!r})", ready)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not dst.exists()
    (tmp,) = glob.glob(str(tmp_path / ".dst.tmp-*"))
    assert os.path.isdir(os.path.join(tmp, PARAMS, "layers.0")) and not os.path.exists(os.path.join(tmp, MARKER))
    with pytest.raises(CheckpointError, match="incomplete gptoss-jax checkpoint"):
        gptoss_jax.load(tmp)
    convert_checkpoint(tiny_hf, dst, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["dst", "ready"]  # the stale temporary folder is gone
    same_logits(tiny_hf, dst, tokens, dtype=jnp.float32)


def test_sigterm_cleans_up(tmp_path, tiny_hf):
    """The command turns SIGTERM into a clean stop: exit code 130, no DST, no temporary folder."""
    dst, ready = tmp_path / "dst", tmp_path / "ready"
    proc = start_paused(f"sys.exit(convert.__main__.main([{str(tiny_hf)!r}, {str(dst)!r}]))", ready)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing was written" in stderr, stderr[-2000:]
    assert os.listdir(tmp_path) == ["ready"]


def test_damaged_folder_errors(tmp_path, tiny_converted):
    dst = shutil.copytree(tiny_converted, tmp_path / "c")
    shutil.rmtree(dst / PARAMS / "layers.1")
    with pytest.raises(CheckpointError, match="missing parameter group folder params/layers.1"):
        gptoss_jax.load(dst)
    marker = json.load(open(dst / MARKER))
    marker["format_version"] = 99
    json.dump(marker, open(dst / MARKER, "w"))
    with pytest.raises(CheckpointError, match="format_version 99"):
        gptoss_jax.load(dst)


# ----------------------------------------------------------------------------------- saving models
def test_save_checkpoint_round_trip(tmp_path, tiny_hf, tokens):
    model = gptoss_jax.load(tiny_hf, dtype=jnp.float32)
    extra = carried_files(tiny_hf)
    dst = save_checkpoint(model, tmp_path / "saved", extra_files=extra)
    assert sorted(os.listdir(dst)) == sorted([MARKER, PARAMS, "generation_config.json"])
    again = gptoss_jax.load(dst, dtype=jnp.float32)
    a, b = flat_paths(nnx.state(model)), flat_paths(nnx.state(again))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]), err_msg=k)
    assert read_marker(dst).dtype == "float32" and read_marker(dst).source == {"kind": "model"}
    with pytest.raises(FileExistsError):
        save_checkpoint(model, dst)
    model.layers[0].attn.lora = AttentionLoRA(Adapter(jnp.zeros((96, 4)), jnp.zeros((4, 4, 16)), (None, None),
                                                      (None, None, None)), None, None, None, scale=1.0, dropout=0.0)
    for write in (save_checkpoint, export_official):  # an adapter not merged into the base
        with pytest.raises(ValueError, match="extra parameter 'layers.0.attn.lora.q.a'"):
            write(model, tmp_path / "adapted")
    assert not os.path.exists(tmp_path / "adapted")


# ----------------------------------------------------------------------------------- commands
def test_cli_commands(tmp_path, tiny_hf, tokens):
    src = shutil.copytree(tiny_hf, tmp_path / "src")
    for name, text in TOKENIZER_FILES.items():
        (src / name).write_text(text)
    assert gptoss_jax_main(["convert", str(src), str(tmp_path / "ours")]) == 0
    assert set(TOKENIZER_FILES) <= set(os.listdir(tmp_path / "ours"))
    same_logits(tiny_hf, tmp_path / "ours", tokens, dtype=jnp.bfloat16)
    assert gptoss_jax_main(["convert", str(src), str(tmp_path / "ours")]) == 2  # exists: a user error
    # python -m convert, not on a terminal: one log line per stage, no progress bar
    result = subprocess.run([sys.executable, "-m", "convert", "--to-official", str(tmp_path / "ours"),
                             str(tmp_path / "hf"), "--max-shard-size", "300KB"], cwd=ROOT, capture_output=True,
                            text=True, env=child_env(), timeout=240)
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if " convert: " in ln]
    assert len(lines) == 3 and "exported 60 tensors" in lines[1], result.stderr
    assert "\r" not in result.stderr and "absl" not in result.stderr
    assert set(TOKENIZER_FILES) <= set(os.listdir(tmp_path / "hf"))
    same_logits(tiny_hf, tmp_path / "hf", tokens, dtype=jnp.float32)


def test_progress_bar_on_request_quiet_otherwise(capsys):
    with Progress("convert", 4096, 2, True) as bar:  # True: a bar even though stderr is not a terminal
        bar.update(1024)
        bar.update(3072)
    err = capsys.readouterr().err
    assert "convert" in err and "2/2 tensors" in err and "4.00k" in err and "B/s" in err
    with Progress("convert", 4096, 2, None) as bar:  # automatic: stderr is not a terminal here
        bar.update(4096)
    assert capsys.readouterr().err == ""
    assert bar.tensors == 1 and bar.bytes == 4096 and "1 tensors, 4.00 KiB in" in bar.summary()


# ----------------------------------------------------------------------------------- meshes
def test_expert_tensors_are_read_per_expert(tiny_converted):
    """One expert per storage chunk: the experts one device of a 4-way expert mesh holds cost about a
    quarter of the tensor's bytes to read (what lets each process read only its devices' shards)."""
    import tensorstore as ts

    def bytes_read():
        found = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
        return sum(v["value"] for m in found for v in m["values"])

    name = "layers.0.mlp.gate_up_blocks"
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": "file://" + os.path.join(
        tiny_converted, PARAMS, "layers.0"), "path": name}}
    reads = []
    for rows in (slice(0, 16), slice(4, 8)):
        array = ts.open(spec, context=ts.Context()).result()  # a fresh context: no cache
        start = bytes_read()
        part = array[rows].read().result()
        reads.append(bytes_read() - start)
    full_size = part.nbytes * 4
    assert reads[0] >= full_size and reads[1] < full_size / 2, reads


@pytest.mark.slow
def test_restore_onto_8_device_mesh(tiny_hf, tiny_converted, tokens):
    """Orbax restores each parameter straight into its sharding; values, shardings and logits equal the
    official loader's placement on the same mesh."""
    code = f"""
import json, numpy as np, jax, jax.numpy as jnp, gptoss_jax
from flax import nnx
from gptoss_jax.checkpoint.shapes import flat_paths
mesh = jax.make_mesh((2, 4), ("model", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
tokens = np.array({tokens.tolist()})
out = {{}}
for experts in ("mxfp4", "dense"):
    ours = gptoss_jax.load({str(tiny_converted)!r}, dtype=jnp.float32, experts=experts, mesh=mesh)
    ref = gptoss_jax.load({str(tiny_hf)!r}, dtype=jnp.float32, experts=experts, mesh=mesh)
    a, b = flat_paths(nnx.state(ours)), flat_paths(nnx.state(ref))
    for k in a:
        x, y = a[k][...], b[k][...]
        assert x.sharding == y.sharding and x.dtype == y.dtype, k
        assert np.array_equal(np.asarray(x), np.asarray(y)), k
        assert len(x.addressable_shards) == 8
    out[experts] = {{k: list(a[k][...].addressable_shards[0].data.shape) for k in a if k.startswith(("embedding", "layers.0."))}}
    out[experts + "_logits_equal"] = bool(np.array_equal(np.asarray(ours.logits(tokens)), np.asarray(ref.logits(tokens))))
print("RESULT" + json.dumps(out))
"""
    result = run_python(code, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    assert out["mxfp4_logits_equal"] and out["dense_logits_equal"]
    # tiny: vocab 1024, hidden 96, 6 q / 2 kv heads of 20, 16 experts, intermediate 64; model=2, expert=4;
    # default rules (expert_tensor): experts over expert x model, heads and vocab over model
    packed, dense = out["mxfp4"], out["dense"]
    assert packed["embedding"] == [512, 96]
    assert packed["layers.0.attn.qkv_kernel"] == [96, 1, 5, 20] and packed["layers.0.attn.qkv_bias"] == [1, 5, 20]
    assert packed["layers.0.attn.o_kernel"] == [3, 20, 96]
    assert packed["layers.0.mlp.gate_up_blocks"] == [2, 128, 3, 16] and packed["layers.0.mlp.gate_up_scales"] == [2, 128, 3]
    assert packed["layers.0.mlp.down_blocks"] == [2, 96, 2, 16] and packed["layers.0.mlp.gate_up_bias"] == [2, 128]
    assert dense["layers.0.mlp.gate_up_kernel"] == [2, 96, 128] and dense["layers.0.mlp.down_kernel"] == [2, 64, 96]
