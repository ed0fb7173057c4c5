"""Model configuration: one frozen dataclass, named presets, and readers/writers for both
official ``config.json`` variants (transformers root folder and ``original/``).

Every shape in the package derives from :class:`GptOssConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"

#: How attention scores are computed (a runtime choice, not a checkpoint field): see
#: gptoss_jax.layers.attention.attention_path.
ATTENTION_IMPLS = ("auto", "xla", "blocked", "pallas")
#: Default smallest decode length bucket (a runtime choice): see gptoss_jax.decode.runner.decode_buckets.
KV_BUCKET_MIN = 1024

# Fields of the reference ``ModelConfig`` dataclass (gpt_oss/torch/model.py); ``original/config.json``
# holds exactly these keys.
ORIGINAL_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
    "rope_ntk_alpha", "rope_ntk_beta",
)
_FLOAT_FIELDS = ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta")
#: field names of folders converted before our fields took the original keys (read, never written)
_RENAMED = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "rope_beta_fast": "rope_ntk_beta",
            "rope_beta_slow": "rope_ntk_alpha"}


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """gpt-oss hyper-parameters. Shapes: q width = num_attention_heads*head_dim, experts [E, 2I, H] etc."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_beta: float = 32.0  # YaRN beta_fast (transformers: rope_scaling.beta_fast)
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow (transformers: rope_scaling.beta_slow)
    initial_context_length: int = 4096
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    layer_types: tuple[str, ...] | None = None  # None: even layers sliding, odd layers full
    eos_token_ids: tuple[int, ...] = (200002,)  # config.json eos_token_id; generation stops: generation_config
    pad_token_id: int = 199999
    bos_token_id: int = 199998

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(
                self, "layer_types", tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            )
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))  # from_dict gets a JSON list
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_position_embeddings(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def concentration(self) -> float:
        """YaRN attention factor applied to both cos and sin: 0.1 ln(factor) + 1."""
        return 0.1 * math.log(self.rope_scaling_factor) + 1.0 if self.rope_scaling_factor > 1 else 1.0

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def window(self, layer: int) -> int:
        """Sliding window of ``layer`` (0 = full attention)."""
        return self.sliding_window if self.is_sliding(layer) else 0

    def replace(self, **changes) -> "GptOssConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- validation
    def validate(self, source: str = "config") -> None:
        def bad(field, msg):
            raise ConfigError(f"{source}: field '{field}' {msg}")

        for f in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "num_experts", "experts_per_token", "vocab_size", "sliding_window",
                  "initial_context_length"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f, f"must be a positive integer, got {v!r}")
        for f in ("rope_theta", "rope_scaling_factor", "rope_ntk_beta", "rope_ntk_alpha",
                  "swiglu_limit", "swiglu_alpha", "rms_norm_eps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                bad(f, f"must be a positive finite number, got {v!r}")
        if self.rope_scaling_factor < 1:
            bad("rope_scaling_factor", f"must be >= 1, got {self.rope_scaling_factor}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            bad("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        for f in ("hidden_size", "intermediate_size"):
            if getattr(self, f) % 32:
                bad(f, f"must be a multiple of 32 (MXFP4 block size), got {getattr(self, f)}")
        if self.experts_per_token > self.num_experts:
            bad("experts_per_token", f"({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", f"has {len(self.layer_types)} entries, expected num_hidden_layers={self.num_hidden_layers}")
        for t in self.layer_types:
            if t not in (SLIDING, FULL):
                bad("layer_types", f"entry {t!r} is not '{SLIDING}' or '{FULL}'")
        if self.rope_scaling_factor > 1:
            low, high = yarn_correction_range(self)
            if not (0 < low < high < self.head_dim / 2 - 1):
                bad("rope_scaling", f"gives a YaRN correction range low={low:.4f}, high={high:.4f} outside "
                    f"(0, head_dim/2 - 1 = {self.head_dim / 2 - 1}); check initial_context_length, beta_fast, beta_slow")

    # ------------------------------------------------------------- file I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GptOssConfig":
        """Read a transformers ``GptOssConfig`` dict (root ``config.json``)."""
        if d.get("model_type") not in (None, "gpt_oss"):
            raise ConfigError(f"{source}: field 'model_type' is {d.get('model_type')!r}, expected 'gpt_oss'")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type not in ("yarn", "default"):
            raise ConfigError(f"{source}: field 'rope_scaling.rope_type' is {rope_type!r}, expected 'yarn'")
        if rope.get("truncate", False):
            raise ConfigError(f"{source}: field 'rope_scaling.truncate' is true; gpt-oss uses an unrounded YaRN range")
        orig = rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096))
        factor = rope.get("factor", 1.0) if rope_type == "yarn" else 1.0
        mpe = d.get("max_position_embeddings")
        if rope_type == "yarn" and mpe is not None and "original_max_position_embeddings" in rope:
            # transformers recomputes factor = max_position_embeddings / original; insist they agree.
            if abs(mpe / orig - factor) > 1e-9:
                raise ConfigError(
                    f"{source}: field 'max_position_embeddings' ({mpe}) / original_max_position_embeddings "
                    f"({orig}) = {mpe / orig} disagrees with rope_scaling.factor ({factor})")
        eos = d.get("eos_token_id", 200002)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        try:
            cfg = cls(
                num_hidden_layers=_req(d, "num_hidden_layers", source),
                hidden_size=_req(d, "hidden_size", source),
                intermediate_size=_req(d, "intermediate_size", source),
                num_attention_heads=_req(d, "num_attention_heads", source),
                num_key_value_heads=_req(d, "num_key_value_heads", source),
                head_dim=d.get("head_dim") or _req(d, "hidden_size", source) // _req(d, "num_attention_heads", source),
                num_experts=d.get("num_local_experts", d.get("num_experts")) or _req(d, "num_local_experts", source),
                experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token")) or _req(d, "num_experts_per_tok", source),
                vocab_size=_req(d, "vocab_size", source),
                sliding_window=d.get("sliding_window") or 128,
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 150000.0))),
                rope_scaling_factor=float(factor),
                rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
                rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
                initial_context_length=int(orig),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
                swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                layer_types=tuple(d["layer_types"]) if d.get("layer_types") else None,
                eos_token_ids=eos,
                pad_token_id=d.get("pad_token_id", 199999) if d.get("pad_token_id") is not None else 199999,
                bos_token_id=d.get("bos_token_id", 199998) if d.get("bos_token_id") is not None else 199998,
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        if d.get("attention_bias") is False:
            raise ConfigError(f"{source}: field 'attention_bias' is false; gpt-oss attention has biases")
        if d.get("tie_word_embeddings"):
            raise ConfigError(f"{source}: field 'tie_word_embeddings' is true; gpt-oss has a separate lm_head")
        return cfg

    @classmethod
    def from_original_dict(cls, d: dict[str, Any], source: str = "original/config.json") -> "GptOssConfig":
        """Read the reference ``ModelConfig`` dict (``original/config.json``).

        Note the swap: ``rope_ntk_alpha`` is YaRN beta_slow and ``rope_ntk_beta`` is beta_fast.
        """
        unknown = sorted(set(d) - set(ORIGINAL_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unexpected field(s) {unknown}; expected only {list(ORIGINAL_KEYS)}")
        defaults = {"num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088,
                    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                    "initial_context_length": 4096, "rope_theta": 150000.0, "rope_scaling_factor": 32.0,
                    "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0}
        g = {**defaults, **d}
        try:  # our field names are the original keys: nothing to translate
            return cls(**{k: float(v) if k in _FLOAT_FIELDS and type(v) is int else v for k, v in g.items()})
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None

    def to_hf_dict(self, quantized: bool = True) -> dict[str, Any]:
        """The transformers ``config.json`` for this model (MXFP4 quantization_config when ``quantized``)."""
        d = {
            "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length, "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size, "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings, "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads, "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers, "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts, "output_router_logits": False,
            "pad_token_id": self.pad_token_id, "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {"beta_fast": self.rope_ntk_beta, "beta_slow": self.rope_ntk_alpha,
                             "factor": self.rope_scaling_factor,
                             "original_max_position_embeddings": self.initial_context_length,
                             "rope_type": "yarn", "truncate": False},
            "rope_theta": self.rope_theta, "router_aux_loss_coef": 0.9, "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit, "tie_word_embeddings": False, "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.bos_token_id != 199998:
            d["bos_token_id"] = self.bos_token_id
        if self.swiglu_alpha != 1.702:
            d["swiglu_alpha"] = self.swiglu_alpha
        if quantized:
            d["quantization_config"] = {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4",
            }
        return d

    def to_original_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ORIGINAL_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """Our own field names (stored next to converted checkpoints)."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "GptOssConfig":
        d = {_RENAMED.get(k, k): v for k, v in d.items()}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"{source}: unexpected field(s) {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{source}:", 1)) from None


def _req(d: dict, key: str, source: str):
    if key not in d:
        raise ConfigError(f"{source}: missing field '{key}'")
    return d[key]


def yarn_correction_range(cfg: GptOssConfig) -> tuple[float, float]:
    """YaRN (low, high) frequency-index range, unrounded (transformers ``truncate: false``)."""
    d_half = cfg.head_dim / 2
    low = d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_beta * 2 * math.pi)) / math.log(cfg.rope_theta)
    high = d_half * math.log(cfg.initial_context_length / (cfg.rope_ntk_alpha * 2 * math.pi)) / math.log(cfg.rope_theta)
    return low, high


def read_config_file(path: str | os.PathLike) -> GptOssConfig:
    """Read either official ``config.json`` variant, telling them apart by their keys."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if "model_type" in d or "num_local_experts" in d or "architectures" in d:
        return GptOssConfig.from_hf_dict(d, source=path)
    return GptOssConfig.from_original_dict(d, source=path)


_REAL = dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
             experts_per_token=4, vocab_size=201088)

#: Named presets. The tiny ones have pairwise-distinct dimensions so a swapped axis cannot pass a test,
#: and a YaRN correction range that lies inside the head so YaRN is really exercised.
PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": GptOssConfig(num_hidden_layers=24, num_experts=32, **_REAL),
    "gpt-oss-120b": GptOssConfig(num_hidden_layers=36, num_experts=128, **_REAL),
    "tiny": GptOssConfig(
        num_hidden_layers=3, hidden_size=96, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=20,
        num_experts=16, experts_per_token=4, vocab_size=1024, sliding_window=8,
        initial_context_length=256, rope_scaling_factor=4.0,
        eos_token_ids=(2,), pad_token_id=0, bos_token_id=1,  # no harmony vocabulary at this size
    ),
    # tiny with the real o200k_harmony vocabulary: the embedded end-to-end demo (tokenizer, chat, server).
    "tiny-harmony": GptOssConfig(
        num_hidden_layers=3, hidden_size=96, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=20,
        num_experts=16, experts_per_token=4, vocab_size=201088, sliding_window=8,
        initial_context_length=256, rope_scaling_factor=4.0,
    ),
}


def get_preset(name: str) -> GptOssConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
