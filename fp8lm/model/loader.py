"""Build a model without allocating it, then stream weights from safetensors straight into place."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fp8lm.errors import ModelLoadError
from fp8lm.model.config import ModelConfig
from fp8lm.model.layers import copy_exact
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


def load_model(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu",
               tp: TensorParallel | None = None) -> LlamaForCausalLM:
    folder = Path(folder)
    config = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, tp)
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    load_weights(model, iter_checkpoint(folder), source=str(folder))
    return model.eval()


def load_weights(model: nn.Module, weights, source: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    for name, tensor in weights:
        if tied and name == "lm_head.weight":
            continue
        param = params.get(name)
        if param is None:
            continue  # e.g. rotary_emb.inv_freq in old checkpoints: derived, not loaded
        loader = getattr(param, "weight_loader", None)
        try:
            with torch.no_grad():
                if loader is not None:
                    loader(param, tensor)
                else:
                    copy_exact(param, tensor, tensor.shape)
        except ValueError as e:
            raise ModelLoadError(f"{source}: {name}: {e}") from None
        loaded.add(name)
    if tied:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source}: checkpoint lacks {shown}")
