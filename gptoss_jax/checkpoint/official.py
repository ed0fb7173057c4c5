"""Official gpt-oss checkpoint folders: layout detection, config, validated tensor access.

Two layouts (see :mod:`gptoss_jax.checkpoint.names`):
- transformers (the repository root): ``config.json`` (``model_type: gpt_oss``), optional
  ``model.safetensors.index.json``, ``model.safetensors`` or 0-based shards
  ``model-0000N-of-0000M.safetensors``; experts MXFP4 when ``quantization_config.quant_method`` is
  ``mxfp4``, else dense bf16 (community dequantized copies);
- original (``original/``): ``config.json`` (reference ``ModelConfig`` keys), ``dtypes.json``,
  ``model.safetensors`` or shards.
A folder holding both (the full hub download) is read in the transformers layout unless
``layout='original'`` is asked for.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from gptoss_jax.checkpoint import safetensors_file
from gptoss_jax.checkpoint.errors import CheckpointError
from gptoss_jax.checkpoint.names import ORIGINAL, TRANSFORMERS, TensorSpec, layout_tensors
from gptoss_jax.checkpoint.safetensors_file import SafetensorsError, SafetensorsFile
from gptoss_jax.config import ConfigError, GptOssConfig

INDEX = "model.safetensors.index.json"
#: Files beside the weights that describe tokenization and generation; carried through conversions.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json")


def _is_hf_config(d: dict) -> bool:
    return "model_type" in d or "architectures" in d or "num_local_experts" in d


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def detect_layout(path: str | os.PathLike, layout: str | None = None) -> tuple[str, str]:
    """Return (layout, folder) for an official checkpoint at ``path`` (root or ``original/``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a folder")
    candidates = []
    for folder in (path, os.path.join(path, "original")):
        cfg = os.path.join(folder, "config.json")
        if os.path.isfile(cfg) and glob.glob(os.path.join(folder, "*.safetensors")):
            candidates.append((TRANSFORMERS if _is_hf_config(_read_json(cfg)) else ORIGINAL, folder))
    if layout is not None:
        candidates = [c for c in candidates if c[0] == layout]
    if not candidates:
        want = f"a {layout} layout" if layout else "an official gpt-oss checkpoint"
        raise CheckpointError(
            f"{path}: unknown layout; expected {want}: config.json + model*.safetensors (transformers, "
            f"the repository root) or config.json + dtypes.json + *.safetensors (original/), or a folder "
            f"written by `gptoss-jax convert`")
    return candidates[0]


@dataclasses.dataclass
class OfficialCheckpoint:
    """A validated official checkpoint: every required tensor present once, with the right shape."""

    folder: str
    layout: str
    config: GptOssConfig
    experts: str  # how the checkpoint stores experts: 'mxfp4' or 'dense'
    specs: list[TensorSpec]
    files: dict[str, SafetensorsFile]  # tensor name -> file holding it
    raw_config: dict

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.files[name].read(name, rows)

    def nbytes(self) -> int:
        return sum(f.info[n][3] - f.info[n][2] for n, f in self.files.items())


def open_checkpoint(path: str | os.PathLike, layout: str | None = None) -> OfficialCheckpoint:
    """Open and validate an official folder. Errors name the file, tensor and expected vs found."""
    layout, folder = detect_layout(path, layout)
    cfg_path = os.path.join(folder, "config.json")
    raw = _read_json(cfg_path)
    try:
        config = GptOssConfig.from_hf_dict(raw, cfg_path) if layout == TRANSFORMERS \
            else GptOssConfig.from_original_dict(raw, cfg_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    experts = "mxfp4"
    if layout == TRANSFORMERS:
        quant = raw.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "mxfp4":
            raise CheckpointError(f"{cfg_path}: field 'quantization_config.quant_method' is "
                                  f"{quant.get('quant_method')!r}; only 'mxfp4' (or no quantization) is supported")
        experts = "mxfp4" if quant else "dense"
    files = _tensor_files(folder, layout)
    specs = layout_tensors(config, layout, experts)
    _validate(folder, cfg_path, specs, files)
    if layout == ORIGINAL:
        _check_dtypes_json(folder, specs)
    return OfficialCheckpoint(folder, layout, config, experts, specs, files, raw)


def _tensor_files(folder: str, layout: str) -> dict[str, SafetensorsFile]:
    index_path = os.path.join(folder, INDEX)
    by_name: dict[str, SafetensorsFile] = {}
    opened: dict[str, SafetensorsFile] = {}

    def open_file(fname: str) -> SafetensorsFile:
        if fname not in opened:
            try:
                opened[fname] = SafetensorsFile(os.path.join(folder, fname))
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
        return opened[fname]

    if os.path.isfile(index_path):
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: missing 'weight_map'")
        for fname in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, fname)):
                raise CheckpointError(f"{index_path}: names file '{fname}', which does not exist in {folder}")
        for name, fname in weight_map.items():
            f = open_file(fname)
            if name not in f.info:
                raise CheckpointError(f"{index_path}: tensor '{name}' is mapped to '{fname}', which does not hold it")
            by_name[name] = f
        for fname, f in opened.items():
            extra = sorted(set(f.info) - set(weight_map))
            if extra:
                raise CheckpointError(f"{os.path.join(folder, fname)}: tensor '{extra[0]}' is not in {INDEX}")
    else:
        for p in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            f = open_file(os.path.basename(p))
            for name in f.info:
                if name in by_name:
                    raise CheckpointError(f"tensor '{name}' appears in both {by_name[name].path} and {p}")
                by_name[name] = f
    return by_name


def _validate(folder: str, cfg_path: str, specs: list[TensorSpec], files: dict[str, SafetensorsFile]) -> None:
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: missing tensor '{missing[0]}'{more}, required by {cfg_path}")
    unexpected = sorted(n for n in files if n not in expected)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{files[unexpected[0]].path}: unexpected tensor '{unexpected[0]}'{more}, "
                              f"not part of a gpt-oss checkpoint with {cfg_path}")
    for name, spec in expected.items():
        dt, shape, _, _ = files[name].info[name]
        if shape != spec.shape:
            raise CheckpointError(f"{files[name].path}: tensor '{name}' has shape {list(shape)}, expected "
                                  f"{list(spec.shape)} from {cfg_path}")
        if dt not in spec.dtypes:
            raise CheckpointError(f"{files[name].path}: tensor '{name}' has dtype {dt}, expected "
                                  f"{' or '.join(spec.dtypes)}")


def _check_dtypes_json(folder: str, specs: list[TensorSpec]) -> None:
    path = os.path.join(folder, "dtypes.json")
    if not os.path.isfile(path):
        return
    logical = _read_json(path)
    for s in specs:
        want = "FP4" if s.name.endswith(".blocks") else "UE8" if s.name.endswith(".scales") else None
        got = logical.get(s.name)
        if got is None:
            raise CheckpointError(f"{path}: no entry for tensor '{s.name}'")
        if want and got != want:
            raise CheckpointError(f"{path}: tensor '{s.name}' is {got}, expected {want}")


def carried_files(*folders: str | os.PathLike) -> dict[str, str]:
    """{name: path} of the :data:`CARRIED_FILES` present in ``folders`` (first found wins). An
    ``original/`` folder also looks in its parent, where the hub keeps the tokenizer."""
    found: dict[str, str] = {}
    search = []
    for folder in map(os.fspath, folders):
        search.append(folder)
        if os.path.basename(os.path.normpath(folder)) == ORIGINAL:
            search.append(os.path.dirname(os.path.normpath(folder)))
    for folder in search:
        for name in CARRIED_FILES:
            path = os.path.join(folder, name)
            if name not in found and os.path.isfile(path):
                found[name] = path
    return found
