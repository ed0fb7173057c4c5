"""Training configuration: a TOML or JSON file, overridable field by field from the command line.

Sections: top level (run), ``[data]``, ``[lora]``, ``[optimizer]``. Every field has a default except
``checkpoint`` and ``data.train``. Errors name the file and the dotted field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from typing import Any

MODES = ("lora", "full")
LORA_TARGETS = ("q", "k", "v", "o", "gate_up", "down")
DTYPES = ("bfloat16", "float32")


class TrainConfigError(ValueError):
    """A training config is invalid; the message names the file and field."""


@dataclasses.dataclass
class DataConfig:
    train: list[str] = dataclasses.field(default_factory=list)  # JSONL files of conversations
    eval: list[str] = dataclasses.field(default_factory=list)
    sequence_length: int = 1024  # tokens per packed row (model inputs)
    packing: bool = True  # several samples per row (attention stays within each sample)
    include_analysis: bool = False  # also train on the assistant's analysis (reasoning) channel
    shuffle: bool = True  # reshuffle samples every epoch (by seed)
    encodings_dir: str = ""  # folder holding o200k_base.tiktoken; default $TIKTOKEN_ENCODINGS_BASE
    date: str = ""  # the system message's "Current date:" for records without "date" (default: today, as serve)


@dataclasses.dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))


@dataclasses.dataclass
class OptimizerConfig:
    """optax AdamW behind global-norm clipping; linear warmup then cosine decay to ``end_learning_rate``."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    end_learning_rate: float = 0.0
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 disables clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


@dataclasses.dataclass
class TrainConfig:
    checkpoint: str = ""  # official gpt-oss folder (transformers layout or original/)
    output_dir: str = "runs/train"
    mode: str = "lora"
    steps: int = 100
    batch_size: int = 8  # rows per micro-batch (global, split over the mesh's data axis)
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    dtype: str = "bfloat16"  # activations and dense weights (full mode trains weights in this dtype)
    mesh: str = ""  # e.g. "data=2,expert=4"; empty = one device
    eval_interval: int = 0  # steps; 0 = only at the end (when eval data is given)
    checkpoint_interval: int = 100
    keep_checkpoints: int = 3
    log_interval: int = 10
    merge: bool = False  # lora: write the merged model to output_dir/merged at the end
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.data.sequence_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "lora": LoraConfig, "optimizer": OptimizerConfig}


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file -> dict."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TrainConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        return json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'} ({e})") from None


def parse_value(text: str) -> Any:
    """A command-line value: TOML syntax (numbers, booleans, [lists], "strings"), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(d: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``lora.rank``) in the nested dict ``d``."""
    *parents, leaf = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise TrainConfigError(f"override '{key}': '{p}' is not a section")
    d[leaf] = value


def from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig`; unknown fields and wrong types name the field."""
    cfg = _build(TrainConfig, d, "", source)
    validate(cfg, source)
    return cfg


def load(path: str | os.PathLike, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:
    """Read a config file and apply ``(dotted key, value)`` overrides."""
    d = read_file(path)
    for key, value in overrides:
        apply_override(d, key, value)
    return from_dict(d, os.fspath(path))


def _build(cls, value, prefix: str, source: str):
    """A config dataclass (the run, or a section at ``prefix``) from a table, field by field."""
    if not isinstance(value, dict):
        raise TrainConfigError(f"{source}: " + (f"field '{prefix[:-1]}' must be a table, got {value!r}" if prefix
                                                else "expected a table of fields"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, v in value.items():
        if key not in fields:
            raise TrainConfigError(f"{source}: unknown field '{prefix}{key}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _build(SECTIONS[key], v, f"{key}.", source) if not prefix and key in SECTIONS \
            else _typed(v, fields[key], prefix + key, source)
    return cls(**kwargs)


def _typed(value, field: dataclasses.Field, name: str, source: str):
    """Check ``value`` against the field's annotated type (int, float, bool, str, list[str])."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, (list, str)) and all(isinstance(v, str) for v in
                                                           ([value] if isinstance(value, str) else value)),
    }[kind]
    if not ok:
        raise TrainConfigError(f"{source}: field '{name}' must be {kind.replace('list[str]', 'a list of strings')}, "
                               f"got {value!r}")
    if kind == "float":
        return float(value)
    if kind == "list[str]" and isinstance(value, str):
        return [value]
    return value


def validate(cfg: TrainConfig, source: str = "config") -> None:
    def bad(field, msg):
        raise TrainConfigError(f"{source}: field '{field}' {msg}")

    if not cfg.checkpoint:
        bad("checkpoint", "is required (an official gpt-oss checkpoint folder)")
    if cfg.mode not in MODES:
        bad("mode", f"must be one of {MODES}, got {cfg.mode!r}")
    if cfg.dtype not in DTYPES:
        bad("dtype", f"must be one of {DTYPES}, got {cfg.dtype!r}")
    if not cfg.data.train:
        bad("data.train", "is required (one or more JSONL files)")
    for name in ("steps", "batch_size", "grad_accum", "checkpoint_interval", "keep_checkpoints", "log_interval",
                 "data.sequence_length", "lora.rank"):
        v = _get(cfg, name)
        if v <= 0:
            bad(name, f"must be a positive integer, got {v}")
    for name in ("eval_interval", "optimizer.warmup_steps", "seed"):
        if _get(cfg, name) < 0:
            bad(name, f"must be >= 0, got {_get(cfg, name)}")
    for name in ("optimizer.learning_rate", "lora.alpha", "optimizer.eps"):
        if not _get(cfg, name) > 0:
            bad(name, f"must be > 0, got {_get(cfg, name)}")
    for name in ("optimizer.end_learning_rate", "optimizer.weight_decay", "optimizer.clip_norm"):
        if not _get(cfg, name) >= 0:
            bad(name, f"must be >= 0, got {_get(cfg, name)}")
    for name in ("optimizer.b1", "optimizer.b2", "lora.dropout"):
        if not 0 <= _get(cfg, name) < 1:
            bad(name, f"must be in [0, 1), got {_get(cfg, name)}")
    if cfg.optimizer.warmup_steps > cfg.steps:
        bad("optimizer.warmup_steps", f"({cfg.optimizer.warmup_steps}) exceeds steps ({cfg.steps})")
    unknown = [t for t in cfg.lora.targets if t not in LORA_TARGETS]
    if unknown or (cfg.mode == "lora" and not cfg.lora.targets):
        bad("lora.targets", f"must be a non-empty subset of {list(LORA_TARGETS)}, got {cfg.lora.targets}")
    if cfg.merge and cfg.mode != "lora":
        bad("merge", "only applies to mode = 'lora' (full mode trains the weights themselves)")


def _get(cfg: TrainConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
