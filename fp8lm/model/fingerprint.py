"""A model's identity for measurement files: its config and a checksum of its weight files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fp8lm.model.loader import safetensors_files

_CHUNK = 8 << 20


def model_fingerprint(folder: Path) -> dict:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape_keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim")
    config_hash = hashlib.sha256(json.dumps({k: config.get(k) for k in shape_keys}, sort_keys=True).encode())
    weights_hash = hashlib.blake2b(digest_size=16)
    for path in safetensors_files(folder):
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                weights_hash.update(chunk)
    return {"name": folder.name, "config_sha256": config_hash.hexdigest()[:16], "weights_blake2b": weights_hash.hexdigest()}
