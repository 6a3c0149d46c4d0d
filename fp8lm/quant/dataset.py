"""Calibration prompts: JSONL ({"text"} or {"messages"}), plain text split at blank lines, or the
builtin set (prose, dialogue, code and numbers, written for this project)."""
from __future__ import annotations

import json
from pathlib import Path

from fp8lm.errors import FP8LMError

BUILTIN = Path(__file__).resolve().parent.parent / "data" / "calibration.jsonl"

Sample = str | list[dict]


def load_samples(source: str, num_samples: int | None = None) -> list[Sample]:
    """Text samples or chat message lists; at most `num_samples` (cycling is never done)."""
    path = BUILTIN if source == "builtin" else Path(source).expanduser()
    if not path.is_file():
        raise FP8LMError(f"dataset {source}: no such file (give a .jsonl or text file, or 'builtin')")
    text = path.read_text(encoding="utf-8", errors="replace")
    samples = _parse_jsonl(text, path) if path.suffix in (".jsonl", ".json") else _parse_text(text)
    if not samples:
        raise FP8LMError(f"dataset {path}: contains no samples")
    return samples[:num_samples] if num_samples else samples


def _parse_jsonl(text: str, path: Path) -> list[Sample]:
    samples: list[Sample] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FP8LMError(f"dataset {path}: line {lineno} column {e.colno}: invalid JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            samples.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            samples.append(row["messages"])
        else:
            raise FP8LMError(f"dataset {path}: line {lineno}: expected an object with a non-empty 'text' "
                             "string or a 'messages' list")
    return samples


def _parse_text(text: str) -> list[Sample]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]
