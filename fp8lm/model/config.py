"""The model's shape, read from an HF config.json and validated before anything is allocated."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fp8lm.errors import ModelLoadError
from fp8lm.files import read_json
from fp8lm.model.families import FAMILIES, Family, activation, check_family_options, family_of

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    layer_windows: tuple[int | None, ...] = ()     # per layer: sliding window, or None (full attention)
    activation: str = "silu"                        # the MLP's gate: silu or gelu_tanh (GeGLU)
    attn_scale: float | None = None                 # scores' scale; None: head_dim ** -0.5
    # Gemma 3: norms scale by 1 + weight and also follow attention and MLP; embeddings are scaled;
    # windowed layers rotate with their own base (and without the global layers' rope_scaling).
    norm_adds_one: bool = False
    sandwich_norms: bool = False
    embed_scale: float | None = None
    local_rope_theta: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config") -> ModelConfig:
        family = family_of(cfg, source)
        check_family_options(family, cfg, source)
        try:
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope_theta, rope_scaling, local_theta = _rope_settings(cfg, family, source)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.gemma)),
                rope_scaling=rope_scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                architecture=family.architecture,
                qkv_bias=family.qkv_bias(cfg),
                o_bias=family.o_bias(cfg),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=family.qk_norm,
                layer_windows=family.layer_windows(cfg, layers),
                activation=activation(family, cfg, source),
                attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if family.gemma else None,
                norm_adds_one=family.gemma,
                sandwich_norms=family.gemma,
                embed_scale=hidden ** 0.5 if family.gemma else None,
                local_rope_theta=local_theta,
                raw=dict(cfg),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: invalid value: {e}") from None

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no config.json in this folder")
        cfg = read_json(path, "model config", ModelLoadError)
        config = cls.from_dict(cfg, source=str(path))
        config.validate(str(path))
        return config

    def validate(self, source: str) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"{source}: rope_scaling type {rope_type!r} is not supported; "
                f"allowed: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _rope_settings(cfg: dict[str, Any], family: Family, source: str) -> tuple[float, dict[str, Any] | None, float | None]:
    """(theta, scaling) of the global layers, and Gemma's windowed layers' theta."""
    params = cfg.get("rope_parameters")
    if not family.gemma:
        return (*_global_rope(cfg, params), None)
    if isinstance(params, dict) and "full_attention" in params:      # transformers 5: one entry per layer type
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{source}: rope scaling on sliding-window layers is not supported")
        theta, scaling = _global_rope({"rope_theta": 1_000_000.0}, params["full_attention"])
        return theta, scaling, float(local.get("rope_theta", 10_000.0))
    theta, scaling = _global_rope({"rope_theta": 1_000_000.0, **cfg}, params)
    return theta, scaling, float(cfg.get("rope_local_base_freq", 10_000.0))


def _global_rope(cfg: dict[str, Any], params) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling.
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling
