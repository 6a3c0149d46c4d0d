"""Decode steps of a whole FP8 decoder as one call of the CPU kernels' DecodeStack (csrc/decode_stack.h):
the same FP8 kernels as the layer-by-layer path, with RMSNorm, the rotary embedding, K's offset,
the residual adds and SiLU·up done between them in C++ instead of ~15 PyTorch ops per layer.

Built only where every layer runs the fused kernels already (FP8 q/k/v and gate/up fused with
static input scales, FP8 o/down, FP8 attention over FP8 caches or float32 ones, no q/k norm, no sliding
window, one rank); anything else keeps the layer-by-layer path, as does every step that is not
decode-only or while a hook observes a module.
"""
from __future__ import annotations

import torch
from torch import nn

from fp8lm.fp8.cpu_kernels import CpuKernels
from fp8lm.model.attention import AttentionMetadata
from fp8lm.model.layers import RMSNorm
from fp8lm.model.linear import ParallelLinear
from fp8lm.model.llama import DecodeKernel, LlamaForCausalLM
from fp8lm.quant.fp8_linear import FP8Panels
from fp8lm.quant.fp8_modules import FP8KVCache, inverse
from fp8lm.quant.fused_ops import FusedFP8Attention, FusedFP8Linears, HookWatch


class FusedFP8DecodeStack(DecodeKernel):
    def __init__(self, model: LlamaForCausalLM, kernels: CpuKernels):
        cfg, layers = model.config, model.model.layers
        attn0 = layers[0].self_attn
        fmt = attn0.o_proj.format.fmt
        self.attentions = [layer.self_attn.attn for layer in layers]
        self.cache_dtype = attn0.attn.fused_attention.cache_dtype     # FP8, or float32 (the model's K/V)
        self.stack = kernels.decode_stack(cfg.hidden_size, attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
                                          cfg.intermediate_size, layers[0].input_layernorm.eps, fmt.dtype, fmt.limit)
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            fused_attn: FusedFP8Attention = attn.attn.fused_attention
            qkv, gate_up = attn.q_proj.fused, mlp.gate_proj.fused
            offset = attn.attn.key_offset
            self.stack.add_layer(
                layer.input_layernorm.weight.detach().float(), layer.post_attention_layernorm.weight.detach().float(),
                _group(qkv), qkv.bias, _single(attn.o_proj), _bias(attn.o_proj), _group(gate_up), gate_up.bias,
                _single(mlp.down_proj), _bias(mlp.down_proj),
                None if offset is None else offset.detach().float().reshape(-1),
                *_write_scales(attn.attn),
                kernels.attention_byte_scales(fused_attn.scales, fmt.dtype), *fused_attn.requantize)
        self.hooks = HookWatch([m for layer in layers for m in layer.modules()])
        self._bound = None

    @classmethod
    def build(cls, model: LlamaForCausalLM, kernels: CpuKernels) -> FusedFP8DecodeStack | None:
        """The stack, or None where some layer cannot run in it (`unfused_reason` says why)."""
        return cls(model, kernels) if unfused_reason(model) is None else None

    def applies(self, x: torch.Tensor, meta) -> bool:
        first = self.attentions[0]      # the runner binds every layer's caches alike
        return (isinstance(meta, AttentionMetadata) and meta.max_query_len == 1 and x.dtype == torch.float32
                and x.device.type == "cpu" and first.k_cache_tensor.dtype == self.cache_dtype
                and not self.hooks.hooked())

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        first = self.attentions[0].k_cache_tensor
        if self._bound is not first:      # the runner (re)bound the caches: a profile step, a new engine
            for i, a in enumerate(self.attentions):
                k, v = a.k_cache_tensor, a.v_cache_tensor
                if k.dtype != torch.float32:
                    k, v = k.view(torch.uint8), v.view(torch.uint8)
                self.stack.bind_caches(i, k, v, a.first_kv)
            self._bound = first
        cos, sin = rope
        t = x.shape[0]
        return self.stack.forward(x, cos.reshape(t, -1), sin.reshape(t, -1), meta.slot_mapping, meta.block_tables,
                                  meta.attn_bias.reshape(meta.batch_size, -1))


def unfused_reason(model: LlamaForCausalLM) -> str | None:
    """Why decode steps cannot run as one call of the whole decoder, or None where they can."""
    layers = model.model.layers
    o_proj = layers[0].self_attn.o_proj
    if model.tp.size != 1:
        return "tensor parallelism (the fused step runs on one rank)"
    if not isinstance(o_proj.format, FP8Panels):
        return "the Linears do not run FP8 on the CPU kernels"
    fmt, eps = o_proj.format.fmt, layers[0].input_layernorm.eps
    cache_dtype = getattr(layers[0].self_attn.attn.fused_attention, "cache_dtype", None)
    for i, layer in enumerate(layers):
        reason = _layer_reason(layer, fmt, eps, cache_dtype)
        if reason is not None:
            return f"layer {i}: {reason}"
    return None


def _layer_reason(layer: nn.Module, fmt, eps: float, cache_dtype: torch.dtype) -> str | None:
    """The first of the stack's assumptions this layer breaks; `fmt`, `eps` and `cache_dtype` are the stack's."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = attn.q_proj.fused, mlp.gate_proj.fused
    checks = [   # each tested only once the ones before it hold
        (lambda: type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm,
         "a norm other than RMSNorm"),
        (lambda: not layer.sandwich_norms and mlp.activation == "silu", "norms after attention and MLP, or GeGLU"),
        (lambda: attn.q_norm is None, "q/k norms"),
        (lambda: attn.attn.sliding_window is None, "a sliding window"),
        (lambda: isinstance(attn.attn.fused_attention, FusedFP8Attention)
         and attn.attn.fused_attention.cache_dtype == cache_dtype,
         "its attention is not FP8 with per-tensor scales over a K/V cache like the first layer's"),
        (lambda: isinstance(qkv, FusedFP8Linears) and qkv.members == (attn.q_proj, attn.k_proj, attn.v_proj),
         "q/k/v are not FP8 with one static input scale"),
        (lambda: isinstance(gate_up, FusedFP8Linears) and gate_up.members == (mlp.gate_proj, mlp.up_proj),
         "gate/up are not FP8 with one static input scale"),
        (lambda: all(_static_kernel_linear(m) for m in (attn.o_proj, mlp.down_proj)),
         "o_proj or down_proj is not FP8 with a static input scale"),
        (lambda: all(f.fmt == fmt for f in (qkv, gate_up, attn.o_proj.format, mlp.down_proj.format,
                                             attn.attn.fused_attention)), "its FP8 formats differ from the first layer's"),
        (lambda: layer.input_layernorm.eps == layer.post_attention_layernorm.eps == eps, "its norms' eps differ"),
    ]
    return next((reason for holds, reason in checks if not holds()), None)


def _write_scales(attn) -> tuple[float, float]:
    """1 / the FP8 caches' scales (the stack's cache writes); a float32 cache takes K/V as they are."""
    if isinstance(attn.k_cache, FP8KVCache):
        return inverse(attn.k_cache.scale), inverse(attn.v_cache.scale)
    return 1.0, 1.0


def _static_kernel_linear(m: ParallelLinear) -> bool:
    return isinstance(m.format, FP8Panels) and m.format.static_scales is not None and m.tp_size == 1


def _group(fused: FusedFP8Linears) -> list[torch.Tensor]:
    return [fused.packed, fused.col_scale, fused.row_scale, fused.inv_scale]


def _single(m: ParallelLinear) -> list[torch.Tensor]:
    row_scale, inv_scale = m.format.static_scales
    return [m.format.packed, m.format.col_scale, row_scale, inv_scale]


def _bias(m: ParallelLinear) -> torch.Tensor | None:
    return None if m.bias is None else m.bias.detach().float()
