"""Decode steps of a whole decoder as one call of the CPU kernels' DecodeStack (csrc/decode_stack.h):
the same kernels as the layer-by-layer path (FP8 or bfloat16 panels, oneDNN's packed Linears, the
attention kernel), with RMSNorm, the rotary embedding, K's offset, the residual adds and SiLU·up done
between them in C++ instead of ~15 PyTorch ops per layer.

Built where every layer's parts already run on those kernels: FP8 models with static input scales
(q/k/v and gate/up fused), unquantized float32 and bfloat16 models, and quantized ones that keep some
Linears or attention layers in high precision; Llama-shaped layers (no q/k norm, no sliding window),
one rank. Anything else keeps the layer-by-layer path (`unfused_reason` says why), as does every step
that is not decode-only, while a hook observes a module, or once a part it copied was swapped.

Activations stay float32 inside the stack: a bfloat16 model's decode steps round only its weights
and caches to bfloat16, not the activations between its matmuls (closer to the float32 model than its
own layers are). FP8 parts of a bfloat16 model keep the layer path: INC casts bfloat16 activations.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from fp8lm.fp8.cpu_kernels import CpuKernels
from fp8lm.model.attention import AttentionMetadata
from fp8lm.model.layers import RMSNorm
from fp8lm.model.linear import OneDNNPacked, ParallelLinear
from fp8lm.model.llama import DecodeKernel, LlamaForCausalLM
from fp8lm.quant.bfloat16_format import BF16Panels
from fp8lm.quant.fp8_linear import FP8Panels
from fp8lm.quant.fp8_modules import FP8KVCache, inverse
from fp8lm.quant.fused_ops import FusedFP8Attention, FusedFP8Linears, HookWatch, PlainKernelAttention

log = logging.getLogger(__name__)


class FusedDecodeStack(DecodeKernel):
    def __init__(self, model: LlamaForCausalLM, kernels: CpuKernels):
        cfg, layers = model.config, model.model.layers
        attn0 = layers[0].self_attn
        fmt = _fp8_format(model)
        self.parts, self.dtype = kernels.module, _model_dtype(model)
        self.attentions = [layer.self_attn.attn for layer in layers]
        self.cache_dtypes = [_cache_dtype(a, self.dtype) for a in self.attentions]
        self.stack = kernels.decode_stack(cfg.hidden_size, attn0.num_heads, attn0.num_kv_heads, attn0.head_dim,
                                          cfg.intermediate_size, layers[0].input_layernorm.eps,
                                          *((fmt.dtype, fmt.limit) if fmt else (torch.float8_e4m3fn, 448.0)))
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            offset = attn.attn.key_offset
            self.stack.add_layer(
                _norm_weight(layer.input_layernorm), _norm_weight(layer.post_attention_layernorm),
                self._group([attn.q_proj, attn.k_proj, attn.v_proj]), self._group([attn.o_proj]),
                self._group([mlp.gate_proj, mlp.up_proj]), self._group([mlp.down_proj]),
                None if offset is None else offset.detach().float().reshape(-1),
                self._attention(attn.attn, kernels, fmt))
        self.hooks = HookWatch([m for layer in layers for m in layer.modules()])
        self.copied = _copied_parts(layers)
        self._bound, self._caches_fit = None, False

    def applies(self, x: torch.Tensor, meta) -> bool:
        return (isinstance(meta, AttentionMetadata) and meta.max_query_len == 1 and x.dtype == self.dtype
                and x.device.type == "cpu" and self._bind_caches() and not self.hooks.hooked()
                and all(holder.get(name) is part for holder, name, part in self.copied))

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        cos, sin = rope
        t = x.shape[0]
        out = self.stack.forward(x.float(), cos.reshape(t, -1).float(), sin.reshape(t, -1).float(), meta.slot_mapping,
                                 meta.block_tables, meta.attn_bias.reshape(meta.batch_size, -1).float())
        return out.to(x.dtype)

    def _bind_caches(self) -> bool:
        """Binds the runner's caches where it (re)bound them (a profile step, a new engine); False while
        some layer's cache is not of the type its attention reads."""
        first = self.attentions[0].k_cache_tensor
        if self._bound is first:
            return self._caches_fit
        self._bound = first
        self._caches_fit = all(a.k_cache_tensor is not None and a.k_cache_tensor.dtype == want
                               for a, want in zip(self.attentions, self.cache_dtypes))
        if self._caches_fit:
            for i, a in enumerate(self.attentions):
                k, v = a.k_cache_tensor, a.v_cache_tensor
                if k.dtype not in (torch.float32, torch.bfloat16):
                    k, v = k.view(torch.uint8), v.view(torch.uint8)
                self.stack.bind_caches(i, k, v, a.first_kv)
        return self._caches_fit

    def _group(self, linears: list[ParallelLinear]) -> list:
        """The stack's projections for Linears that read one input: their fused FP8 group, or one each."""
        fused = linears[0].fused
        if isinstance(fused, FusedFP8Linears) and fused.members == tuple(linears):
            return [self.parts.fp8_projection(fused.packed, fused.col_scale, fused.row_scale, fused.inv_scale,
                                              fused.bias)]
        return [self._projection(m) for m in linears]

    def _projection(self, m: ParallelLinear):
        f, bias = m.format, _bias(m)
        if isinstance(f, FP8Panels):
            row_scale, inv_scale = f.static_scales
            return self.parts.fp8_projection(f.packed, f.col_scale, row_scale, inv_scale, bias)
        if isinstance(f, BF16Panels):
            return self.parts.bf16_projection(f.panels, m.out_features, bias)
        return self.parts.onednn_projection(f.packed, m.out_features, bias)

    def _attention(self, attn, kernels: CpuKernels, fmt):
        fused = attn.fused_attention
        if isinstance(fused, FusedFP8Attention):
            return self.parts.fp8_attention(kernels.attention_byte_scales(fused.scales, fmt.dtype),
                                            *_write_scales(attn), *fused.requantize)
        return self.parts.plain_attention(float(attn.scale))


def fuse_decode_steps(model: LlamaForCausalLM, kernels: CpuKernels) -> None:
    """Sets the model's whole-decoder decode step where it can run; logs why where it cannot."""
    reason = unfused_reason(model)
    model.model.fused_decode = None if reason else FusedDecodeStack(model, kernels)
    if reason:
        log.info("decode steps run layer by layer, not as one fused call of the decoder: %s", reason)


def unfused_reason(model: LlamaForCausalLM) -> str | None:
    """Why decode steps cannot run as one call of the whole decoder, or None where they can."""
    layers = model.model.layers
    if model.tp.size != 1:
        return "tensor parallelism (the fused step runs on one rank)"
    dtype = _model_dtype(model)
    if dtype not in (torch.float32, torch.bfloat16):
        return f"the model's dtype is {dtype}"
    fmts = {f.fmt for layer in layers for f in _fp8_parts(layer)}
    if len(fmts) > 1:
        return "the layers' FP8 formats differ"
    if fmts and dtype != torch.float32:
        return "FP8 layers of a bfloat16 model (INC casts bfloat16 activations; the fused step's are float32)"
    eps = layers[0].input_layernorm.eps
    for i, layer in enumerate(layers):
        reason = _layer_reason(layer, eps)
        if reason is not None:
            return f"layer {i}: {reason}"
    return None


def _layer_reason(layer: nn.Module, eps: float) -> str | None:
    """The first of the stack's assumptions this layer breaks; `eps` is the stack's."""
    attn, mlp = layer.self_attn, layer.mlp
    checks = [   # each tested only once the ones before it hold
        (lambda: type(layer.input_layernorm) is RMSNorm and type(layer.post_attention_layernorm) is RMSNorm,
         "a norm other than RMSNorm"),
        (lambda: not layer.sandwich_norms and mlp.activation == "silu", "norms after attention and MLP, or GeGLU"),
        (lambda: attn.q_norm is None, "q/k norms"),
        (lambda: attn.attn.sliding_window is None, "a sliding window"),
        (lambda: isinstance(attn.attn.fused_attention, (FusedFP8Attention, PlainKernelAttention)),
         "its attention does not run on the CPU kernels (FP8 with per-tensor scales, or plain)"),
        (lambda: all(_stack_linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                                mlp.gate_proj, mlp.up_proj, mlp.down_proj)),
         "a Linear is neither FP8 with a static input scale, nor the kernels' bfloat16 panels, nor oneDNN-packed"),
        (lambda: layer.input_layernorm.eps == layer.post_attention_layernorm.eps == eps, "its norms' eps differ"),
    ]
    return next((reason for holds, reason in checks if not holds()), None)


def _copied_parts(layers) -> list[tuple[dict, str, object]]:
    """What the stack copied out of the layers, as (the dict that holds it, its name, it): a swapped
    module, format or attention kernel (a comparison, a report) sends steps back to the layers. Plain
    dict lookups: ~450 module attribute reads per step cost ~0.8 ms on SmolLM2."""
    parts = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts.append((vars(attn.attn), "fused_attention", attn.attn.fused_attention))
        for holder, name in [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj"),
                             (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]:
            linear = getattr(holder, name)
            parts += [(holder._modules, name, linear), (vars(linear), "format", linear.format)]
    return parts


def _stack_linear(m: ParallelLinear) -> bool:
    f = m.format
    if m.tp_size != 1:
        return False
    if isinstance(f, FP8Panels):
        return f.static_scales is not None
    return isinstance(f, (BF16Panels, OneDNNPacked))


def _fp8_parts(layer: nn.Module) -> list:
    """The layer's FP8 Linear formats and FP8 attention (each has `fmt`)."""
    linears = [m.format for m in layer.modules() if isinstance(m, ParallelLinear) and isinstance(m.format, FP8Panels)]
    attention = layer.self_attn.attn.fused_attention
    return linears + ([attention] if isinstance(attention, FusedFP8Attention) else [])


def _fp8_format(model: LlamaForCausalLM):
    return next((f.fmt for layer in model.model.layers for f in _fp8_parts(layer)), None)


def _model_dtype(model: LlamaForCausalLM) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def _cache_dtype(attn, model_dtype: torch.dtype) -> torch.dtype:
    """What the layer's attention reads: an FP8 layer's cache type, or a plain layer's model dtype."""
    fused = attn.fused_attention
    return fused.cache_dtype if isinstance(fused, FusedFP8Attention) else model_dtype


def _write_scales(attn) -> tuple[float, float]:
    """1 / the FP8 caches' scales (the stack's cache writes); a float32 cache takes K/V as they are."""
    if isinstance(attn.k_cache, FP8KVCache):
        return inverse(attn.k_cache.scale), inverse(attn.v_cache.scale)
    return 1.0, 1.0


def _norm_weight(norm: RMSNorm) -> torch.Tensor:
    return norm.weight.detach().float().contiguous()


def _bias(m: ParallelLinear) -> torch.Tensor | None:
    return None if m.bias is None else m.bias.detach().float()
