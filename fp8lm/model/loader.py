"""Build a model without allocating it, then stream weights from safetensors straight into place."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fp8lm.errors import ModelLoadError
from fp8lm.model.config import ModelConfig
from fp8lm.model.families import fused_parts
from fp8lm.model.linear import copy_exact
from fp8lm.model.llama import LlamaForCausalLM, TensorParallel


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights in this folder")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{index}: names {f.name}, which is missing")
    return files


def iter_checkpoint(folder: Path):
    """Yields (name, tensor) one at a time; only one tensor is resident beyond the model itself."""
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocates (uninitialized) every tensor still on the meta device. Unlike `to_empty`, it keeps
    tensors that already hold values (scales set by a transform) and keeps shared ones shared."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    fresh = torch.empty_like(t, device=device)
                    made[id(t)] = nn.Parameter(fresh, requires_grad=False) if isinstance(t, nn.Parameter) else fresh
                store[name] = made[id(t)]


def load_model(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu",
               tp: TensorParallel | None = None, transform: Callable[[nn.Module], None] | None = None,
               rename: Callable[[str], str] | None = None) -> LlamaForCausalLM:
    """`transform` edits the model while it is still on the meta device (FP8 patching). Then its
    weights load on the CPU, one checkpoint tensor at a time (`rename` maps checkpoint names to
    model names), and the result moves to `device`."""
    folder = Path(folder)
    config = ModelConfig.from_folder(folder)
    with torch.device("meta"), default_dtype(dtype):
        model = LlamaForCausalLM(config, tp)
    if transform is not None:
        transform(model)
    staging = torch.device("cpu") if transform is not None else torch.device(device)
    required = {n for n, t in _named_tensors(model).items() if t.is_meta}
    materialize(model, staging)
    model.tie_weights()
    weights = iter_checkpoint(folder)
    if rename is not None:
        weights = ((rename(n), t) for n, t in weights)
    if config.family.fused_checkpoint:
        weights = split_fused(config, weights)
    load_weights(model, weights, source=str(folder), required=required)
    if staging != torch.device(device):
        model.to(device)
    return model.eval()


def split_fused(config: ModelConfig, weights):
    """Fused qkv_proj / gate_up_proj tensors (and their biases and scales) split into the modules
    they hold: row blocks where the tensor has one row per output feature, else the same value
    (a per-tensor scale) for each."""
    d = config.head_dim
    rows = {"self_attn.q_proj": config.num_attention_heads * d, "self_attn.k_proj": config.num_key_value_heads * d,
            "self_attn.v_proj": config.num_key_value_heads * d, "mlp.gate_proj": config.intermediate_size,
            "mlp.up_proj": config.intermediate_size}
    for name, tensor in weights:
        parts = fused_parts(name)
        if parts is None:
            yield name, tensor
            continue
        prefix, suffix, members = parts
        sizes = [rows[m] for m in members]
        pieces = tensor.split(sizes) if tensor.dim() and tensor.shape[0] == sum(sizes) else [tensor] * len(members)
        for member, piece in zip(members, pieces):
            yield f"{prefix}{member}.{suffix}", piece


def _load_one(model: nn.Module, target: str, tensor: torch.Tensor, where: str) -> None:
    """Modules that shard or quantize their parameters load them themselves (`load_tensor`)."""
    module_name, _, param_name = target.rpartition(".")
    module = model.get_submodule(module_name)
    try:
        with torch.no_grad():
            if hasattr(module, "load_tensor"):
                module.load_tensor(param_name, tensor)
            else:
                copy_exact(getattr(module, param_name), tensor, tensor.shape)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def load_weights(model: nn.Module, weights, source: str, required: set[str] | None = None) -> None:
    """Loads (name, tensor) pairs; every name in `required` (default: all parameters) must come."""
    params = _named_tensors(model)
    loaded: set[str] = set()
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    for name, tensor in weights:
        if tied and name == "lm_head.weight":
            continue
        # A tied LM head loads from the embedding (it may be a separate FP8 copy of it).
        targets = [name, "lm_head.weight"] if tied and name == "model.embed_tokens.weight" else [name]
        for target in targets:
            if target not in params:
                continue  # e.g. rotary_emb.inv_freq in old checkpoints: derived, not loaded
            _load_one(model, target, tensor, f"{source}: {target}")
            loaded.add(target)
    if required is None:
        required = set(dict(model.named_parameters(remove_duplicate=False)))
    missing = sorted(required - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source}: checkpoint lacks {shown}")
