"""The one path from loaded weights to a model that computes in FP8, shared by calibrated
quantization (QUANT_CONFIG) and quantized checkpoints: each says what it decided in a `PostLoad`,
and `finish_quantized_model` applies it in the one order that works (attention state before the
fused paths that read it; the kept bfloat16 Linears last)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fp8lm.fp8.cpu_kernels import kernels_for
from fp8lm.model.attention import CacheAdjustment
from fp8lm.model.llama import LlamaForCausalLM
from fp8lm.model.linear import ParallelLinear
from fp8lm.quant.bfloat16_format import keep_bfloat16_values
from fp8lm.quant.fused_ops import FusedFP8Attention, FusedFP8Linears


@dataclass
class PostLoad:
    key_offsets: dict[str, torch.Tensor] = field(default_factory=dict)   # attention name -> [kv_heads, head_dim]
    exact_first_token: set[str] = field(default_factory=set)             # attention names
    bfloat16_values: list[str] = field(default_factory=list)             # Linears kept with bfloat16 values


def finish_quantized_model(model: LlamaForCausalLM, plan: PostLoad, device: torch.device, dtype: torch.dtype) -> None:
    for name in set(plan.key_offsets) | plan.exact_first_token:
        offset = plan.key_offsets.get(name)
        model.get_submodule(name).adjustment = CacheAdjustment(None if offset is None else offset.to(device, dtype),
                                                               name in plan.exact_first_token)
    prepare_formats(model, device, dtype)
    kernels = kernels_for(device)
    for name in plan.bfloat16_values:
        keep_bfloat16_values(model.get_submodule(name), kernels)


def prepare_formats(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype) -> None:
    """Each Linear's format for computing, once its weights are loaded; then the fused paths where
    they can run: projections that read one input (FusedFP8Linears) and fully FP8 attention layers on
    the CPU kernels (the whole-decoder decode step comes once the engine has prepared the rest)."""
    for module in model.modules():
        if isinstance(module, ParallelLinear):
            module.format = module.format.prepare(module, device, dtype)
    for group in model.projection_groups():
        linears = [m for _, m in group]
        if FusedFP8Linears.can_fuse(linears):
            linears[0].fused = FusedFP8Linears(linears)
    kernels = kernels_for(device)
    if kernels is None:
        return
    for attn in model.attention_layers():
        if FusedFP8Attention.can_fuse(attn):
            attn.fused_attention = FusedFP8Attention(attn, kernels)
