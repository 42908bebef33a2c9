"""Model configuration read from a HF `config.json`, validated, with no silent defaults.

Core shape fields must be present. Optional switches that HF itself defaults per family
(biases, tied embeddings, RoPE scaling, sliding window) take the HF class default when absent,
so a checkpoint means the same here as in transformers; anything we cannot honour raises.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "qwen3_moe",
            "mixtral")
GEMMA = ("gemma2", "gemma3_text")


class ConfigError(ValueError):
    """A config file is missing, incomplete or asks for something unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"               # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors stored with the weights (a GGUF file's rope_freqs: llama.cpp's
    # converter writes Llama 3.1-style scaling so); () for none.
    freq_factors: tuple[float, ...] = ()

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """[H/2] float32 inverse frequencies, as HF computes them (llama3 scaling included), or
        as llama.cpp does with freq_factors."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        inv = (1.0 / (np.float32(self.theta) ** exponent)).astype(np.float32)
        if self.freq_factors:
            return (inv / np.asarray(self.freq_factors, np.float32)).astype(np.float32)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        old_len = self.original_max_position_embeddings
        low_wavelen = old_len / self.low_freq_factor
        high_wavelen = old_len / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (old_len / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Which layers attend through sliding_window (Gemma's local layers); () = every layer.
    sliding_layers: tuple[bool, ...] = ()
    # RoPE of the sliding-window layers where it differs from `rope` (Gemma 3's local base).
    local_rope: RopeConfig | None = None
    # Gemma: embeddings times sqrt(hidden), (1 + w) RMSNorm, norms after attention and the MLP
    # too, GeGLU (tanh GELU), logit soft-caps, q.k / sqrt(query_pre_attn_scalar).
    gemma: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    # Mixture of experts (Qwen3-MoE, Mixtral): which layers route each token to experts_per_token of
    # num_experts SwiGLU experts of width moe_intermediate_size (the others are dense).
    moe_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it sees every earlier key)."""
        if not self.sliding_layers:
            return self.sliding_window
        return self.sliding_window if self.sliding_layers[layer] else None

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The distinct windows over the layers, in layer order: one decode plan each."""
        return tuple(dict.fromkeys(self.window(i) for i in range(self.num_layers)))

    def rope_of(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope and self.window(layer) else self.rope

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; "
                              f"supported: {list(FAMILIES)}")
        if self.moe_layers and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.experts_per_token}) must be between 1 "
                              f"and num_experts ({self.num_experts})")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ConfigError(f"{len(self.sliding_layers)} layer types for {self.num_layers} "
                              "layers")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Reads `config.json` in a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{file}: no such file (a HF checkpoint directory has config.json)")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return from_hf_dict(raw, source=str(file))


def _need(raw: dict, key: str, source: str, kind=int):
    if raw.get(key) is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    value = raw[key]
    if kind is not float and not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{source}: field {key!r} should be {kind.__name__}, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: field {key!r} should be a number, got {value!r}")
    return kind(value)


def _rope(raw: dict, source: str, layer_type: str | None = None) -> RopeConfig:
    params = raw.get("rope_parameters")  # transformers >= 5
    if params is not None and layer_type in params:       # one per layer type (Gemma 3)
        params = params[layer_type]
    elif params is None:
        if raw.get("rope_theta") is None:
            raise ConfigError(f"{source}: required field 'rope_theta' (or 'rope_parameters') "
                              "is missing")
        params = dict(raw.get("rope_scaling") or {}, rope_theta=raw["rope_theta"])
    kind = params.get("rope_type", params.get("type", "default"))
    theta = _need(params, "rope_theta", source + " rope_parameters", float)
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, "linear", _need(params, "factor", source + " rope_scaling",
                                                 float))
    if kind != "llama3":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported "
                          "(supported: 'default', 'linear', 'llama3')")
    sub = source + " rope_scaling"
    return RopeConfig(
        theta, "llama3", _need(params, "factor", sub, float),
        _need(params, "low_freq_factor", sub, float),
        _need(params, "high_freq_factor", sub, float),
        _need(params, "original_max_position_embeddings", sub))


def _gemma(raw: dict, source: str, layers: int) -> dict:
    """Gemma 2 / Gemma 3 (text) fields of ModelConfig: the local layers from layer_types (or
    the pattern HF derives when it is absent: every 2nd layer global in Gemma 2, every
    sliding_window_pattern-th in Gemma 3), Gemma 3's local RoPE (rope_parameters per layer
    type, or rope_local_base_freq), soft-caps and the query scale."""
    gemma3 = raw["model_type"] == "gemma3_text"
    if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: hidden_activation {raw['hidden_activation']!r} is not "
                          "supported (supported: 'gelu_pytorch_tanh')")
    types = raw.get("layer_types")
    if types is None:
        every = int(raw.get("sliding_window_pattern", 6)) if gemma3 else 2
        types = ["sliding_attention" if (i + 1) % every else "full_attention"
                 for i in range(layers)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"{source}: layer types {sorted(unknown)} are not supported "
                          "(supported: 'sliding_attention', 'full_attention')")
    # Absent fields take the HF config classes' defaults (Gemma 2's soft-caps 50 and 30).
    caps = {} if gemma3 else dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    raw = {"sliding_window": 4096, "query_pre_attn_scalar": 256, **caps, **raw}
    out = dict(gemma=True, qk_norm=gemma3, tie_word_embeddings=bool(raw.get(
        "tie_word_embeddings", True)), sliding_window=_need(raw, "sliding_window", source),
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        attn_logit_softcap=raw.get("attn_logit_softcapping"),
        final_logit_softcap=raw.get("final_logit_softcapping"),
        query_pre_attn_scalar=_need(raw, "query_pre_attn_scalar", source, float))
    if gemma3:
        out["rope"] = _rope(raw, source, "full_attention")
        params = raw.get("rope_parameters") or {}
        out["local_rope"] = (_rope(raw, source, "sliding_attention")
                             if "sliding_attention" in params
                             else RopeConfig(float(raw.get("rope_local_base_freq", 10000.0))))
    return out


def _moe(raw: dict, source: str, layers: int) -> dict:
    """Qwen3-MoE's fields: a layer routes to experts unless mlp_only_layers names it or it is
    not a multiple of decoder_sparse_step (1-based), as HF decides."""
    # transformers >= 5 writes num_local_experts (Mixtral's name), earlier ones num_experts
    experts = _need(raw, "num_experts" if "num_experts" in raw else "num_local_experts", source)
    step = int(raw.get("decoder_sparse_step", 1))
    dense = set(raw.get("mlp_only_layers") or [])
    return dict(moe_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0
                                 for i in range(layers)),
                num_experts=experts, experts_per_token=_need(raw, "num_experts_per_tok", source),
                moe_intermediate_size=_need(raw, "moe_intermediate_size", source),
                norm_topk_prob=bool(raw.get("norm_topk_prob", False)))


def _mixtral(raw: dict, source: str, layers: int) -> dict:
    """Mixtral's fields: every layer routes to its experts (of width intermediate_size), and
    the top-k weights are always renormalised."""
    return dict(moe_layers=(True,) * layers,
                num_experts=_need(raw, "num_local_experts", source),
                experts_per_token=_need(raw, "num_experts_per_tok", source),
                moe_intermediate_size=_need(raw, "intermediate_size", source),
                norm_topk_prob=True)


def from_hf_dict(raw: dict, source: str = "config.json") -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        raise ConfigError(f"{source}: model_type 'gemma3' is Gemma 3 with its vision tower, "
                          "which is not supported; a text-only checkpoint (model_type "
                          "'gemma3_text', Gemma3ForCausalLM) is")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; "
                          f"supported: {list(FAMILIES)}")
    hidden = _need(raw, "hidden_size", source)
    heads = _need(raw, "num_attention_heads", source)
    head_dim = raw.get("head_dim") or hidden // heads
    if raw.get("use_sliding_window") and model_type in ("qwen2", "qwen3"):
        raise ConfigError(f"{source}: use_sliding_window=true (per-layer windows) is not "
                          "supported yet")
    bias = bool(raw.get("attention_bias", False))
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    layers = _need(raw, "num_hidden_layers", source)
    family = (_gemma(raw, source, layers) if model_type in GEMMA
              else _moe(raw, source, layers) if model_type == "qwen3_moe"
              else _mixtral(raw, source, layers) if model_type == "mixtral" else {})
    return ModelConfig(**{**dict(
        model_type=model_type,
        vocab_size=_need(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_need(raw, "intermediate_size", source),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_need(raw, "num_key_value_heads", source),
        head_dim=int(head_dim),
        rms_norm_eps=_need(raw, "rms_norm_eps", source, float),
        rope=family["rope"] if "rope" in family else _rope(raw, source),
        max_position_embeddings=_need(raw, "max_position_embeddings", source),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else bias,
        o_bias=bias if model_type in ("llama", "qwen3", "qwen3_moe", *GEMMA) else False,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=raw.get("sliding_window") if model_type in ("mistral", "mixtral")
        else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    ), **family})
