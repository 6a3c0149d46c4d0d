"""The decoder families fp8lm runs, as the few ways they differ from Llama, read from an HF config.

Every family is the same decoder (model/llama.py) with options: bias on q/k/v (and on o), per-head
RMSNorm on q and k, an explicit head_dim, sliding-window attention per layer, checkpoints that
store q/k/v or gate/up as one fused tensor (split on load, fused again on export, so module and
measurement names stay per projection as INC's are), and Gemma 3's layout (GeGLU, norms that scale
by 1 + weight before and after attention and MLP, scaled embeddings, its own attention scale and a
second rotary base for its sliding-window layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fp8lm.errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    architecture: str
    model_type: str
    differences: str                       # for the README's status table and error messages
    fused_checkpoint: bool = False         # qkv_proj / gate_up_proj tensors (Phi-3)
    qk_norm: bool = False                  # q_norm / k_norm over head_dim before rotary (Qwen3, Gemma 3)
    gemma: bool = False                    # Gemma 3's layout (see the module docstring)

    def qkv_bias(self, cfg: dict[str, Any]) -> bool:
        if self.model_type == "qwen2":
            return True
        return bool(cfg.get("attention_bias", False))

    def o_bias(self, cfg: dict[str, Any]) -> bool:
        return self.model_type in ("llama", "qwen3") and bool(cfg.get("attention_bias", False))

    def layer_windows(self, cfg: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
        """The sliding window of each layer (keys q-window+1..q attended), None for full attention."""
        window = cfg.get("sliding_window")
        if self.model_type in ("qwen2", "qwen3"):
            if not cfg.get("use_sliding_window", False):
                window = None
            types = cfg.get("layer_types")
            if window is not None and types is None:
                first = int(cfg.get("max_window_layers", num_layers))
                types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
            if window is not None:
                return tuple(int(window) if t == "sliding_attention" else None for t in types)
        if self.model_type == "llama":
            window = None
        if self.gemma and window is not None:
            types = cfg.get("layer_types") or _gemma_layer_types(cfg, num_layers)
            return tuple(int(window) if t == "sliding_attention" else None for t in types)
        return (None if window is None else int(window),) * num_layers


def _gemma_layer_types(cfg: dict[str, Any], num_layers: int) -> list[str]:
    # Older Gemma 3 configs give a period instead: every `sliding_window_pattern`-th layer is global.
    period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)]


FAMILIES = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama", "the reference layout (attention_bias / mlp_bias options)"),
    Family("Qwen2ForCausalLM", "qwen2", "bias on q/k/v (not o); optional sliding window on upper layers"),
    Family("Qwen3ForCausalLM", "qwen3", "per-head RMSNorm on q and k before rotary; explicit head_dim", qk_norm=True),
    Family("MistralForCausalLM", "mistral", "Llama's layout; sliding_window (null or e.g. 4096)"),
    Family("Phi3ForCausalLM", "phi3", "fused qkv_proj and gate_up_proj tensors in the checkpoint; sliding window",
           fused_checkpoint=True),
    Family("Gemma3ForCausalLM", "gemma3_text", "GeGLU; (1 + w) RMSNorms before and after attention and MLP; "
           "q/k norms; scaled embeddings; sliding-window layers with their own rotary base", qk_norm=True, gemma=True),
)}
_BY_TYPE = {f.model_type: f for f in FAMILIES.values()}

# What an unsupported architecture needs that the decoder lacks, found from its config keys.
_MISSING = (
    (("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"), "mixture-of-experts layers"),
    (("kv_lora_rank", "q_lora_rank"), "multi-head latent attention (MLA)"),
    (("layers_block_type", "mamba_d_state", "linear_attn_config", "full_attention_interval", "ssm_cfg"),
     "hybrid attention / state-space layers"),
)


def family_of(cfg: dict[str, Any], source: str) -> Family:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    if not archs and cfg.get("model_type") in _BY_TYPE:
        return _BY_TYPE[cfg["model_type"]]
    missing = [what for keys, what in _MISSING if any(k in cfg for k in keys)]
    why = f" (it needs {', '.join(missing)}, which fp8lm does not implement)" if missing else ""
    raise ModelLoadError(f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}{why}; "
                         f"fp8lm runs {', '.join(FAMILIES)}")


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}     # config name -> the MLP's gate


def activation(family: Family, cfg: dict[str, Any], source: str) -> str:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if family.gemma else "silu")
    if act not in ACTIVATIONS:
        raise ModelLoadError(f"{source}: hidden activation {act!r} is not supported; fp8lm's MLP gates with "
                             f"{' or '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def check_family_options(family: Family, cfg: dict[str, Any], source: str) -> None:
    """Options of a supported family that the decoder does not implement are refused by name."""
    activation(family, cfg, source)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelLoadError(f"{source}: {key}={cfg[key]} is not supported (Gemma 2's soft-capping)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{source}: use_bidirectional_attention is not supported; fp8lm's decoder is causal")
    rope = cfg.get("rope_parameters") or {}
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor {partial} is not supported; fp8lm rotates whole heads")


# Fused checkpoint tensor -> the modules it holds, in row order (Phi-3).
FUSED_MODULES = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_MEMBER_OF = {member: fused for fused, members in FUSED_MODULES.items() for member in members}


def fused_parts(name: str) -> tuple[str, str, tuple[str, ...]] | None:
    """'model.layers.3.self_attn.qkv_proj.weight' -> ('model.layers.3.', 'weight', member modules)."""
    for fused, members in FUSED_MODULES.items():
        head, sep, suffix = name.partition(f".{fused}.")
        if sep:
            return head + ".", suffix, members
    return None


def fused_module_name(module_name: str) -> str:
    """A per-projection module's name in a fused checkpoint ('...q_proj' -> '...qkv_proj')."""
    head, _, tail = module_name.partition(".layers.")
    layer, _, local = tail.partition(".")
    fused = _MEMBER_OF.get(local)
    return f"{head}.layers.{layer}.{fused}" if fused else module_name
