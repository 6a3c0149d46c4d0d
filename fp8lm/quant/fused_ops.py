"""The fused paths of the CPU kernels: FP8 projections that share an input as one kernel call, and
attention layers as one kernel call over the paged cache, fully FP8 ones (quant/post_load.py picks
them once weights are loaded) and plain ones (the engine's CPU load). Each runs only while no hook
observes the modules it stands in for (`HookWatch`)."""
from __future__ import annotations

import torch
from torch import nn

from fp8lm.model.attention import AttentionKernel
from fp8lm.model.layers import KVCache, Matmul, Softmax
from fp8lm.model.linear import FusedProjections, ParallelLinear
from fp8lm.quant.fp8_linear import FP8Panels
from fp8lm.quant.fp8_modules import FP8KVCache, FP8Matmul, FP8Softmax


class HookWatch:
    """Whether any of `modules` has a forward (pre-)hook, or a global one is set: a fused path skips
    the modules' own forwards and would bypass them. Asked every step, so it keeps the modules'
    hook dicts (registering a hook adds to them in place) and tests those without a Python loop."""

    def __init__(self, modules):
        self._dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]

    def hooked(self) -> bool:
        g = nn.modules.module
        return any(self._dicts) or bool(g._global_forward_hooks or g._global_forward_pre_hooks)


class KernelAttention(AttentionKernel):
    """An attention layer as one call of the CPU kernels over its paged cache, decode steps and prompt
    chunks alike: K/V written through the layer's cache modules, then `attend` on the queries padded
    per sequence. Runs while no hook observes the modules it stands in for."""

    def __init__(self, attn, kernels):
        self.kernels = kernels
        # Not the layer itself: the kernel runs inside its forward, so the layer's own hooks still run.
        self.hooks = HookWatch((attn.matmul_qk, attn.softmax, attn.matmul_av, attn.k_cache, attn.v_cache))

    def attend(self, attn, queries: torch.Tensor, bias: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
        attn.k_cache(k, attn.k_cache_tensor, meta.slot_mapping)
        attn.v_cache(v, attn.v_cache_tensor, meta.slot_mapping)
        b, length = meta.batch_size, meta.max_query_len
        if length == 1:      # decode: token i is sequence i's query (see AttentionMetadata)
            queries, bias = q.contiguous(), meta.attn_bias.reshape(b, -1)
        else:                # prompt chunks: queries padded to [B, L], one bias row each
            queries, bias = q[meta.query_index], meta.attn_bias.reshape(b, length, -1)
        out = self.attend(attn, queries, bias, meta.block_tables).reshape(b * length, -1)
        return out if length == 1 else out[meta.flat_index]


class FusedFP8Attention(KernelAttention):
    """An attention layer whose two matmuls and softmax are FP8, over an FP8 cache (FP8 K/V caches) or
    a float32 one (the model's K/V, cast onto the matmuls' grids as FP8Matmul casts them): the modules'
    arithmetic, fused (FP8 casts bit-identical; the softmax's exp and the sums' order may differ in
    the last bit), keys a query's mask hides never computed."""

    def __init__(self, attn, kernels):
        super().__init__(attn, kernels)
        qk, sm, av = attn.matmul_qk, attn.softmax, attn.matmul_av
        fp8_cache = isinstance(attn.k_cache, FP8KVCache)
        cache_scales = [attn.k_cache.scale, attn.v_cache.scale] if fp8_cache else [1.0, 1.0]
        self.scales = [attn.scale, qk.scale_a, qk.scale_b, sm.output_scale, av.scale_a, av.scale_b, *cache_scales]
        self.requantize = (not qk.reads_own_grid(attn.k_cache.grid_scale), not av.reads_own_grid(attn.v_cache.grid_scale))
        self.fmt = qk.fmt
        self.cache_dtype = attn.k_cache.cache_dtype if fp8_cache else torch.float32

    @staticmethod
    def can_fuse(attn) -> bool:
        """FP8 matmuls and softmax of one format with scalar scales, over FP8 caches of that format or
        plain ones."""
        modules = (attn.matmul_qk, attn.softmax, attn.matmul_av)
        if not (isinstance(attn.matmul_qk, FP8Matmul) and isinstance(attn.matmul_av, FP8Matmul)
                and isinstance(attn.softmax, FP8Softmax)):
            return False
        caches = (attn.k_cache, attn.v_cache)
        if all(isinstance(c, FP8KVCache) for c in caches):
            modules += caches
            scaled = ((attn.k_cache, ("scale",)), (attn.v_cache, ("scale",)))
        elif all(type(c) is KVCache for c in caches):
            scaled = ()
        else:
            return False
        scalar = all(isinstance(getattr(m, n), float) for m, names in (
            (attn.matmul_qk, ("scale_a", "scale_b")), (attn.matmul_av, ("scale_a", "scale_b")),
            (attn.softmax, ("output_scale",)), *scaled) for n in names)
        return scalar and len({m.fmt for m in modules}) == 1 and kernel_head_dim(attn.head_dim)

    def applies(self, attn, q: torch.Tensor, meta) -> bool:
        return (q.dtype == torch.float32 and q.device.type == "cpu"
                and attn.k_cache_tensor.dtype == self.cache_dtype and not self.hooks.hooked())

    def attend(self, attn, queries: torch.Tensor, bias: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        return self.kernels.paged_attention(queries, attn.k_cache_tensor, attn.v_cache_tensor, block_tables, bias,
                                            self.scales, self.requantize, self.fmt.dtype, self.fmt.limit,
                                            attn.first_kv)


class PlainKernelAttention(KernelAttention):
    """An attention layer of plain modules over a float32 or bfloat16 cache: softmax(q·kᵀ·scale + bias)·v
    in float32 arithmetic (a bfloat16 layer's scores and probabilities are not rounded to bfloat16 as
    its modules round them), keys a query's mask hides never computed."""

    @staticmethod
    def can_fuse(attn) -> bool:
        plain = (type(attn.matmul_qk) is Matmul and type(attn.matmul_av) is Matmul and type(attn.softmax) is Softmax
                 and type(attn.k_cache) is KVCache and type(attn.v_cache) is KVCache)
        return plain and kernel_head_dim(attn.head_dim) and not attn.exact_first_token

    def applies(self, attn, q: torch.Tensor, meta) -> bool:
        return (q.dtype in PLAIN_CACHE_DTYPES and q.device.type == "cpu" and attn.k_cache_tensor.dtype == q.dtype
                and not self.hooks.hooked())

    def attend(self, attn, queries: torch.Tensor, bias: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        out = self.kernels.plain_attention(queries.float().contiguous(), attn.k_cache_tensor, attn.v_cache_tensor,
                                           block_tables, bias.float().contiguous(), attn.scale, attn.first_kv)
        return out.to(queries.dtype)


PLAIN_CACHE_DTYPES = (torch.float32, torch.bfloat16)


def kernel_head_dim(head_dim: int) -> bool:
    """Whether the kernels' attention takes this head size (whole vectors of every ISA)."""
    return head_dim % 16 == 0


def fuse_plain_attention(model, kernels) -> int:
    """Every attention layer of plain modules without a fused path gets the kernels' plain attention;
    returns how many."""
    layers = [a for a in model.attention_layers() if a.fused_attention is None and PlainKernelAttention.can_fuse(a)]
    for attn in layers:
        attn.fused_attention = PlainKernelAttention(attn, kernels)
    return len(layers)


class FusedFP8Linears(FusedProjections):
    """Linears that read the same input with the same static input scale, run as one kernel call
    over their concatenated weight panels (the members keep views of them: no extra memory)."""

    def __init__(self, linears: list[ParallelLinear]):
        self.members = tuple(linears)
        self.hooks = HookWatch(linears)
        formats: list[FP8Panels] = [m.format for m in linears]
        self.gemm, self.fmt = formats[0].gemm, formats[0].fmt
        self.packed = torch.cat([f.packed for f in formats])
        start = 0
        for f in formats:
            f.packed = self.packed[start:start + f.packed.shape[0]]
            start += f.packed.shape[0]
        self.sizes = [m.out_features for m in linears]
        self.col_scale = torch.cat([f.col_scale for f in formats])
        self.row_scale, self.inv_scale = formats[0].static_scales
        self.bias = None if linears[0].bias is None else torch.cat([m.bias.float() for m in linears])

    @staticmethod
    def can_fuse(linears) -> bool:
        if not all(isinstance(m.format, FP8Panels) and m.shard_dim == 0
                   and isinstance(m.input_scale, float) for m in linears):
            return False
        first = linears[0]
        return (all(m.format.fmt == first.format.fmt and m.input_scale == first.input_scale
                    and m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
                    for m in linears)
                and all(m.out_features % 32 == 0 for m in linears[:-1]))   # panels never straddle members

    def applies(self, linears) -> bool:
        """Only for these very modules, and only while nothing observes them one by one (hooks)."""
        return tuple(linears) == self.members and not self.hooks.hooked()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = x.shape
        y = self.gemm.linear(x.reshape(-1, shape[-1]), self.packed, sum(self.sizes), self.fmt.dtype,
                             self.col_scale, self.row_scale, self.inv_scale, self.fmt.limit, self.bias)
        return tuple(part.reshape(*shape[:-1], part.shape[-1]) for part in y.split(self.sizes, dim=-1))
