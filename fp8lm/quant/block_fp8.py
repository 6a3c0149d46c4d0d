"""Block-FP8, the format model makers publish (Qwen3-FP8, DeepSeek-V3): each Linear's weight in
float8_e4m3fn with one scale per [block_n, block_k] block (`weight_scale_inv`, w ≈ fp8 * scale,
float32 or UE8M0 powers of two), its input quantized at run time per token in groups of block_k
(dynamic 1 x block_k scales). Blocks at a matrix's edge may be partial (576 = 4.5 blocks of 128).

With tensor parallelism each rank keeps its rows or columns of W and the whole (small) scale grid,
with each row's and column's block index: a shard need not start or end on a block boundary.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fp8lm.errors import FP8LMError, ModelLoadError
from fp8lm.fp8.cpu_kernels import CpuKernels, kernel_col_scale, kernels_for, pack_panels, unpack_panels
from fp8lm.fp8.numerics import fake_quant, to_fp8
from fp8lm.model.layers import KVCache
from fp8lm.model.linear import LinearFormat, ParallelLinear, copy_exact
from fp8lm.quant.fp8_modules import E4M3, FP8Format
from fp8lm.quant.modules import replace_module
from fp8lm.quant.online_fp8 import unit_kv_cache
from fp8lm.quant.post_load import PostLoad, finish_quantized_model

log = logging.getLogger(__name__)

class BlockFP8Linear(LinearFormat):
    def __init__(self, block: tuple[int, int], fmt: FP8Format = E4M3):
        super().__init__()
        self.block_n, self.block_k = block
        self.fmt = fmt

    def load(self, layer: ParallelLinear, name: str, full: torch.Tensor) -> None:
        if name == "weight":
            if full.dtype != self.fmt.dtype:
                raise ValueError(f"block-FP8 weight of dtype {full.dtype}; expected {self.fmt.dtype}")
            copy_exact(layer.weight, layer.shard(full, layer.shard_dim), full.shape)
            self._index_blocks(layer, full.shape)
        elif name == "weight_scale_inv":
            copy_exact(layer.weight_scale_inv, full.float(), full.shape)   # UE8M0: exact powers of two
        else:
            raise ValueError(f"block-FP8 {type(layer).__name__} has no parameter {name!r}")

    def _index_blocks(self, layer: ParallelLinear, full_shape) -> None:
        """Each of this rank's rows and columns -> its block row / column in the full scale grid."""
        start = layer.tp_rank * (full_shape[layer.shard_dim] // layer.tp_size)
        rows, cols = torch.arange(layer.out_features), torch.arange(layer.in_features)
        if layer.shard_dim == 0:
            rows = rows + start
        else:
            cols = cols + start
        layer.register_buffer("block_rows", rows // self.block_n, persistent=False)
        layer.register_buffer("block_cols", cols // self.block_k, persistent=False)

    def apply(self, layer, x, bias):
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).float()
        groups = layer.block_cols
        # Per token, the largest magnitude of each group of block_k input features.
        maxabs = torch.zeros(x.shape[0], int(groups[-1]) + 1, device=x.device).scatter_reduce_(
            1, groups.expand(x.shape[0], -1), x.abs(), "amax")
        scale = self.group_scale(maxabs)[:, groups]
        xq = fake_quant(x, 1 / scale, self.fmt.dtype, self.fmt.limit) * scale
        y = F.linear(xq, self.dense_weight(layer)).to(dtype).reshape(*shape[:-1], layer.out_features)
        return y if bias is None else y + bias

    def group_scale(self, maxabs: torch.Tensor) -> torch.Tensor:
        """An input group's scale from its largest magnitude (onto the format's full range)."""
        return (maxabs / self.fmt.limit).clamp(min=torch.finfo(torch.float32).tiny)

    def prepare(self, layer, device, dtype):
        """On the CPU kernels: `BlockFP8Panels`; on GPUs with blockwise FP8 GEMMs: `BlockFP8Native`;
        elsewhere this reference path."""
        if device.type == "cuda" and (self.block_n, self.block_k) == NATIVE_BLOCK and _whole_blocks(layer) \
                and blockwise_mm_works(device):
            return BlockFP8Native.from_layer(layer)
        kernels = kernels_for(device)
        if kernels is None:
            return self
        groups = _runs(layer.block_cols.tolist())
        panels = [pack_panels(layer.weight.detach()[:, start:end]) for start, end, _ in groups]
        cols = [kernel_col_scale(layer.weight_scale_inv[layer.block_rows, g], layer.out_features, self.fmt.dtype)
                for _, _, g in groups]
        layer.release_weight()
        return BlockFP8Panels((self.block_n, self.block_k), kernels, [(s, e) for s, e, _ in groups], panels, cols)

    def fp8_weight(self, layer) -> torch.Tensor:
        return layer.weight.detach()

    def dense_weight(self, layer):
        scales = layer.weight_scale_inv[layer.block_rows][:, layer.block_cols]
        return self.fp8_weight(layer).float() * scales

    def describe(self) -> str:
        return f"block-FP8 {self.block_n}x{self.block_k}, dynamic 1x{self.block_k} inputs"


class BlockFP8Panels(BlockFP8Linear):
    """The CPU kernels, one W8A8 call per block column of W (its FP8 panels, each output row's block
    scale, each token's group scale), the calls' float32 results summed: 1 byte per weight."""

    def __init__(self, block: tuple[int, int], kernels: CpuKernels, groups: list[tuple[int, int]],
                 panels: list[torch.Tensor], col_scales: list[torch.Tensor]):
        super().__init__(block)
        self.kernels, self.groups, self.panels, self.col_scales = kernels, groups, panels, col_scales

    def apply(self, layer, x, bias):
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1]).float()
        y = None
        for (start, end), packed, col in zip(self.groups, self.panels, self.col_scales):
            group = x[:, start:end].contiguous()
            scale = self.group_scale(group.abs().amax(dim=1))
            part = self.kernels.linear(group, packed, layer.out_features, self.fmt.dtype, col, scale, 1 / scale,
                                       self.fmt.limit)
            y = part if y is None else y + part
        y = y.to(dtype).reshape(*shape[:-1], layer.out_features)
        return y if bias is None else y + bias

    def fp8_weight(self, layer) -> torch.Tensor:
        return torch.cat([unpack_panels(p, layer.out_features, self.fmt.dtype) for p in self.panels], dim=1)

    def describe(self) -> str:
        return super().describe() + f", cpu-{self.kernels.isa}"


NATIVE_BLOCK = (128, 128)      # the block torch's blockwise FP8 GEMM takes


class BlockFP8Native(BlockFP8Linear):
    """torch's blockwise FP8 GEMM (`F.scaled_mm`, 1x128 input groups x 128x128 weight blocks; Hopper):
    W and its scale grid padded once to whole blocks, each input padded to whole groups."""

    def __init__(self, weight: torch.Tensor, weight_scale_t: torch.Tensor):
        super().__init__(NATIVE_BLOCK)
        self.weight, self.weight_scale_t = weight, weight_scale_t      # [N', K'] FP8, [K'/128, N'/128]

    @classmethod
    def from_layer(cls, layer: ParallelLinear) -> BlockFP8Native:
        n, k = layer.weight.shape
        w = F.pad(layer.weight.detach().view(torch.uint8), (0, -k % 128, 0, -n % 128)).view(layer.weight.dtype)
        rows = layer.block_rows[::128].long()
        cols = layer.block_cols[::128].long()
        scale = layer.weight_scale_inv[rows][:, cols].float()
        layer.release_weight()
        return cls(w.contiguous(), scale.t())

    def apply(self, layer, x, bias):
        shape, dtype = x.shape, x.dtype
        n, k = layer.out_features, layer.in_features
        x = F.pad(x.reshape(-1, k).float(), (0, self.weight.shape[1] - k))
        groups = x.view(x.shape[0], -1, 128)
        scale = self.group_scale(groups.abs().amax(dim=2))                                    # [M, K'/128]
        xq = to_fp8(groups, 1 / scale[:, :, None], self.fmt.dtype, self.fmt.limit).view(x.shape)
        y = F.scaled_mm(xq, self.weight.t(), scale.t().contiguous().t(), F.ScalingType.BlockWise1x128,
                        self.weight_scale_t, F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
        y = y[:, :n].to(dtype).reshape(*shape[:-1], n)
        return y if bias is None else y + bias

    def fp8_weight(self, layer) -> torch.Tensor:
        return self.weight[:layer.out_features, :layer.in_features]

    def dense_weight(self, layer):
        scales = self.weight_scale_t.t().repeat_interleave(128, 0).repeat_interleave(128, 1)
        return (self.weight.float() * scales)[:layer.out_features, :layer.in_features]

    def describe(self) -> str:
        return super().describe() + ", native blockwise F.scaled_mm"


def _whole_blocks(layer: ParallelLinear) -> bool:
    """This rank's rows and columns start on block boundaries (a TP shard may not): their block
    indices step every 128 from the first."""
    return all(torch.equal(index - index[0], torch.arange(len(index), device=index.device) // 128)
               for index in (layer.block_rows, layer.block_cols))


@functools.cache
def blockwise_mm_works(device: torch.device) -> bool:
    """Whether this device runs torch's blockwise FP8 GEMM and it equals the reference on a small
    case with a partial block (it needs Hopper and a recent CUDA build; otherwise the reference path)."""
    if not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        layer = ParallelLinear(320, 200, bias=False)
        make_block_fp8(layer, NATIVE_BLOCK)
        gen = torch.Generator().manual_seed(0)
        w, scale = quantize_blocks(torch.randn(200, 320, generator=gen), NATIVE_BLOCK)
        layer.format.load(layer, "weight", w)
        layer.format.load(layer, "weight_scale_inv", scale)
        x = torch.randn(5, 320, generator=gen)
        expected = layer.format.apply(layer, x, None)
        layer.to(device)
        native = BlockFP8Native.from_layer(layer)
        got = native.apply(layer, x.to(device), None).float().cpu()
    except (RuntimeError, TypeError, ValueError) as e:
        log.info("blockwise FP8 GEMM unavailable on %s (%s): block-FP8 runs the reference path", device, e)
        return False
    # bfloat16 output: within a few of its ulps of the float32 reference
    works = bool(((got - expected).abs() <= 2 ** -6 * expected.abs() + 1e-3).all())
    if not works:
        log.warning("blockwise FP8 GEMM on %s differs from the reference: block-FP8 runs the reference path", device)
    return works


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, value) of each run of equal consecutive values."""
    runs, start = [], 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[start]:
            runs.append((start, i, indices[start]))
            start = i
    return runs


def make_block_fp8(layer: ParallelLinear, block: tuple[int, int]) -> None:
    """Makes a (not yet loaded) Linear block-FP8: its weight FP8, its full scale grid a buffer."""
    grid = (-(-layer.out_features * (layer.tp_size if layer.shard_dim == 0 else 1) // block[0]),
            -(-layer.in_features * (layer.tp_size if layer.shard_dim == 1 else 1) // block[1]))
    layer.replace_weight(torch.empty(layer.weight.shape, dtype=torch.float8_e4m3fn, device=layer.weight.device))
    layer.register_buffer("weight_scale_inv", torch.empty(grid, device=layer.weight.device))
    layer.format = BlockFP8Linear(block)


class BlockFP8Checkpoint:
    """A folder with quantization_config {"quant_method": "fp8", "weight_block_size": [bn, bk],
    "activation_scheme": "dynamic"}: every Linear but those in `modules_to_not_convert` is block-FP8."""

    def __init__(self, folder: Path, qconfig: dict, device: torch.device, dtype: torch.dtype,
                 kv_cache_fp8: bool = False):
        self.device, self.dtype, self.kv_cache_fp8 = device, dtype, kv_cache_fp8
        block, scheme = qconfig.get("weight_block_size"), qconfig.get("activation_scheme", "dynamic")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ModelLoadError(f"{folder}/config.json: weight_block_size {block!r}: expected [block_n, block_k]")
        if scheme != "dynamic" or qconfig.get("fmt", "e4m3") != "e4m3":
            raise ModelLoadError(f"{folder}/config.json: fp8 {qconfig.get('fmt', 'e4m3')} with {scheme} activations is "
                                 "not supported; fp8lm reads e4m3 weights with dynamic activation scales")
        self.block = tuple(block)
        self.keep = [str(m) for m in qconfig.get("modules_to_not_convert") or []]

    def patch(self, model: nn.Module) -> None:
        for name, module in list(model.named_modules()):
            if isinstance(module, ParallelLinear) and not self._kept(name):
                make_block_fp8(module, self.block)
            elif isinstance(module, KVCache) and self.kv_cache_fp8:
                replace_module(model, name, unit_kv_cache())

    def _kept(self, name: str) -> bool:
        return any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in self.keep)

    def rename(self, name: str) -> str:
        return name

    def finish(self, model: nn.Module) -> None:
        finish_quantized_model(model, PostLoad(), self.device, self.dtype)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int], fmt: FP8Format = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, its [ceil(n / bn), ceil(k / bk)] float32 block scales): each block's largest
    magnitude maps onto the format's full scale."""
    n, k = weight.shape
    bn, bk = block
    w = weight.float()
    padded = F.pad(w.abs(), (0, -k % bk, 0, -n % bn))
    maxabs = padded.view(-(-n // bn), bn, -(-k // bk), bk).amax(dim=(1, 3))
    scales = (maxabs / fmt.limit).clamp(min=torch.finfo(torch.float32).tiny)
    expanded = scales.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w / expanded).clamp(-fmt.limit, fmt.limit).to(fmt.dtype), scales


def save_block_fp8(source_folder: Path, output: Path, block: tuple[int, int] = (128, 128),
                   keep: tuple[str, ...] = ("lm_head",)) -> Path:
    """Writes `source_folder` (an unquantized model) as a block-FP8 folder: every Linear's weight but
    those of `keep` (modules_to_not_convert) quantized per block. No calibration: inputs are scaled
    at run time."""
    from fp8lm.model.config import ModelConfig
    from fp8lm.model.llama import LlamaForCausalLM
    from fp8lm.model.loader import iter_checkpoint
    from fp8lm.quant.checkpoint import write_folder

    if len(block) != 2 or min(block) < 1:
        raise FP8LMError(f"--weight-block-size {' '.join(map(str, block))}: two positive sizes, N and K")
    config = ModelConfig.from_folder(source_folder)
    if config.family.fused_checkpoint:
        raise FP8LMError(f"{source_folder}: --format block-fp8 needs a checkpoint with separate q/k/v and gate/up "
                         f"projections ({config.family.name} fuses them)")
    if config.raw.get("quantization_config"):
        raise FP8LMError(f"{source_folder} is already quantized")
    with torch.device("meta"):
        linears = {f"{n}.weight" for n, m in LlamaForCausalLM(config).named_modules()
                   if isinstance(m, ParallelLinear) and n not in keep}
    tensors = {}
    for name, tensor in iter_checkpoint(Path(source_folder)):
        if name in linears:
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = quantize_blocks(tensor, block)
        else:
            tensors[name] = tensor
    raw = dict(config.raw)
    if raw.get("tie_word_embeddings") and "lm_head" not in keep:
        raw["tie_word_embeddings"] = False
        tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = quantize_blocks(
            tensors["model.embed_tokens.weight"], block)
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block), "modules_to_not_convert": list(keep)}
    return write_folder(source_folder, output, tensors, raw, {})
