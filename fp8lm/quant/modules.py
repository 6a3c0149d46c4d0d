"""Which of the model's modules the INC flow can measure and quantize, under which type names.

Each module answers to the INC type names a QUANT_CONFIG may use in allowlist/blocklist `types`
(e.g. a row-parallel o_proj is both "Linear" and "RowParallelLinear"), and has a kind that says
what is measured: how many inputs, which parameters, whether the output is always needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fp8lm.model.layers import KVCache, Matmul, Softmax
from fp8lm.model.linear import ColumnParallelLinear, LMHead, RowParallelLinear


@dataclass(frozen=True)
class ModuleKind:
    name: str
    num_inputs: int
    params: tuple[str, ...]
    output_required: bool


LINEAR = ModuleKind("linear", 1, ("weight",), False)
MATMUL = ModuleKind("matmul", 2, (), False)
SOFTMAX = ModuleKind("softmax", 1, (), True)
KV_CACHE = ModuleKind("kv_cache", 1, (), False)

_TYPES: dict[type, tuple[tuple[str, ...], ModuleKind]] = {
    ColumnParallelLinear: (("Linear", "ColumnParallelLinear"), LINEAR),
    RowParallelLinear: (("Linear", "RowParallelLinear"), LINEAR),
    LMHead: (("Linear", "ParallelLMHead"), LINEAR),
    Matmul: (("Matmul",), MATMUL),
    Softmax: (("Softmax",), SOFTMAX),
    KVCache: (("KVCache", "VLLMKVCache"), KV_CACHE),
}


def quantizable_modules(model: nn.Module):
    """Yields (name, module, inc_type_names, kind) for every module the FP8 flow knows."""
    for name, module in model.named_modules():
        entry = _TYPES.get(type(module))
        if entry is not None:
            yield name, module, entry[0], entry[1]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
