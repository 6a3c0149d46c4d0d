"""Reading the JSON files users hand us, with one clear error naming the file and the problem."""
from __future__ import annotations

import json
import os
from pathlib import Path

from fp8lm.errors import FP8LMError


def read_json(path: Path, label: str, error: type[FP8LMError] = FP8LMError):
    """`label` says what the file is to the user (e.g. "QUANT_CONFIG"); `error` is the type raised."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{label} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{label} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def cache_dir() -> Path:
    """Where fp8lm keeps what it builds or downloads once per machine (FP8LM_CACHE, default ~/.cache/fp8lm)."""
    return Path(os.environ.get("FP8LM_CACHE") or Path.home() / ".cache" / "fp8lm")
