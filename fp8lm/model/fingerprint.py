"""A model's identity for measurement files: its config and a checksum of its weight files.

The checksum samples each file (its size, its safetensors header and 1 MiB from the start,
middle and end of the data) so that it costs the same for 100 MB and 800 GB checkpoints; any
re-quantization, fine-tune or different shard layout changes it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fp8lm.model.loader import safetensors_files

_SAMPLE = 1 << 20


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            f.seek(offset)
            h.update(f.read(_SAMPLE))


def model_fingerprint(folder: Path) -> dict:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape_keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim")
    config_hash = hashlib.sha256(json.dumps({k: config.get(k) for k in shape_keys}, sort_keys=True).encode())
    weights_hash = hashlib.blake2b(digest_size=16)
    for path in safetensors_files(folder):
        _file_digest(path, weights_hash)
    return {"name": folder.name, "config_sha256": config_hash.hexdigest()[:16],
            "weights_checksum": weights_hash.hexdigest()}
