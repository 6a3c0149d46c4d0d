"""Measurement and scale files, named and structured as in the INC flow:

    <prefix>_hooks_<observer>[_<rank>_<world>].json / .npz / _mod_list.json
    {"GlobalRank", "LocalRank", "Mode": "DynamicRange"|"Scale", "NumSamples", "Nodes": {
        name: {"inputs": [...], "outputs": [...], "params": {"weight": ...}}}}

fp8lm adds a top-level "Fp8lmMetadata" object (device, dtype, model fingerprint, …), which INC
ignores. Files are written to temporary names and renamed into place together, with Ctrl-C held
off meanwhile; files already there are first moved to a backup name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from fp8lm.errors import FP8LMError
from fp8lm.files import read_json, replace_durably

log = logging.getLogger(__name__)
METADATA_KEY = "Fp8lmMetadata"


def rank_suffix(rank: int, world_size: int) -> str:
    return f"_{rank}_{world_size}" if world_size > 1 else ""


def measurement_base(prefix: Path, observer: str, rank: int = 0, world_size: int = 1) -> Path:
    return Path(f"{prefix}_hooks_{observer}{rank_suffix(rank, world_size)}")


def find_measurement(prefix: Path, observer: str, rank: int, world_size: int) -> Path | None:
    """The measurement for this rank; at world size 1 also the '_0_1' name that unify and vLLM write."""
    candidates = [measurement_base(prefix, observer, rank, world_size)]
    if world_size == 1:
        candidates.append(Path(f"{prefix}_hooks_{observer}_0_1"))
    return next((c for c in candidates if Path(f"{c}.json").is_file()), None)


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value


def node_to_numpy(node: dict) -> dict:
    """{"inputs": [..], "outputs": [..], "params": {name: ..}} with every value a float32 array."""
    out = {}
    for key, value in node.items():
        if key == "params":
            out[key] = {p: np.asarray(v, dtype=np.float32) for p, v in value.items()}
        else:
            out[key] = [np.asarray(v, dtype=np.float32) for v in value]
    return out


def file_payload(nodes: dict, mode: str, rank: int, world_size: int, num_samples: int, metadata: dict) -> dict:
    ranked = world_size > 1
    payload = {"GlobalRank": rank if ranked else None, "LocalRank": rank if ranked else None, "Mode": mode}
    if num_samples:
        payload = {"NumSamples": num_samples, **payload}
    payload["Nodes"] = nodes
    payload[METADATA_KEY] = metadata
    return payload


@contextlib.contextmanager
def _sigint_deferred():
    """Holds Ctrl-C until the block ends, so a set of renames is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *a: received.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def write_files(base: Path, payload: dict, backup: bool = True) -> list[Path]:
    """Writes base.json, base.npz and base_mod_list.json atomically; returns their paths.
    Files already there are moved to a backup name first, unless `backup` is False (caches)."""
    base = Path(base)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FP8LMError(f"dump_stats_path {base.parent}: cannot create the folder ({e.strerror})") from None
    targets = [Path(f"{base}.json"), Path(f"{base}.npz"), Path(f"{base}_mod_list.json")]
    temps = [t.with_name(f".{t.name}.tmp-{os.getpid()}") for t in targets]
    try:
        temps[0].write_text(json.dumps(_to_json(payload), indent=4))
        numpy_payload = {**payload, "Nodes": {k: node_to_numpy(v) for k, v in payload["Nodes"].items()}}
        with open(temps[1], "wb") as f:   # INC keeps the whole dict as one pickled object array
            np.savez(f, numpy_payload)
        temps[2].write_text(json.dumps(list(payload["Nodes"]), indent=4))
        with _sigint_deferred():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for target in targets:
                if backup and target.exists():
                    backup = target.with_name(f"backup_{stamp}_{target.name}")
                    os.replace(target, backup)
                    log.info("moved existing %s to %s", target.name, backup.name)
            # base.json, which fp8lm reads, goes last: it names a complete set.
            replace_durably([(temps[1], targets[1]), (temps[2], targets[2]), (temps[0], targets[0])])
    except OSError as e:
        raise FP8LMError(f"cannot write measurement files at {base}: {e.strerror or e}") from None
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return targets


def read_files(base: Path) -> dict:
    """The JSON payload with every node's values as numpy arrays."""
    path = Path(f"{base}.json")
    payload = read_json(path, "measurement file")
    if "Nodes" not in payload or not isinstance(payload["Nodes"], dict):
        raise FP8LMError(f"{path}: not a measurement file (no 'Nodes' object)")
    payload["Nodes"] = {name: node_to_numpy(node) for name, node in payload["Nodes"].items()}
    return payload
