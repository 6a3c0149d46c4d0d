"""The quantized checkpoint formats fp8lm reads, by config.json's quantization_config.quant_method.
A new format is one reader class (patch / rename / finish, as quant/checkpoint.py's) and a line here."""
from __future__ import annotations

from pathlib import Path

import torch

from fp8lm.errors import ModelLoadError
from fp8lm.quant.block_fp8 import BlockFP8Checkpoint
from fp8lm.quant.checkpoint import CheckpointQuantization

READERS = {
    "compressed-tensors": CheckpointQuantization,   # llm-compressor's and `fp8lm quantize`'s FP8 folders
    "fp8": BlockFP8Checkpoint,                      # block-FP8 (Qwen3-FP8, DeepSeek-V3)
}


def checkpoint_quantization(folder: Path, qconfig: dict, device: torch.device, dtype: torch.dtype,
                            kv_cache_fp8: bool = False):
    """The reader of a quantized folder's format. `kv_cache_fp8`: an FP8 KV cache is asked for (a
    folder without KV scales then gets scale 1.0, as vLLM gives it)."""
    reader = READERS.get(qconfig.get("quant_method"))
    if reader is None:
        raise ModelLoadError(f"{folder}/config.json: quant_method {qconfig.get('quant_method')!r} is not supported; "
                             f"fp8lm reads {', '.join(READERS)}")
    return reader(folder, qconfig, device, dtype, kv_cache_fp8)
