"""Turn measurements from N tensor-parallel ranks into M (N divisible by M): each new rank merges a
group of N/M consecutive old ranks. A per-tensor maximum is the maximum over the group. A
per-channel array is concatenated in rank order where its channels are what the ranks split (a
column-parallel Linear's weight rows and outputs, a row-parallel Linear's input features) and
element-wise maximized where every rank sees all channels (the rest)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fp8lm.errors import FP8LMError
from fp8lm.quant.measure_files import file_payload, read_files, write_files


def find_rank_files(prefix: Path, observer: str) -> dict[int, Path]:
    """rank -> measurement base of `<prefix>_hooks_<observer>_<rank>_<world>`; all share one world size."""
    pattern = re.compile(re.escape(f"{Path(prefix).name}_hooks_{observer}_") + r"(\d+)_(\d+)\.json$")
    found: dict[int, tuple[int, Path]] = {}
    for path in Path(prefix).parent.glob(f"{Path(prefix).name}_hooks_{observer}_*.json"):
        m = pattern.match(path.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), path.with_suffix(""))
    if not found:
        raise FP8LMError(f"no per-rank measurement files {prefix}_hooks_{observer}_<rank>_<world>.json found")
    worlds = {w for w, _ in found.values()}
    if len(worlds) != 1:
        raise FP8LMError(f"{prefix}: files from several world sizes {sorted(worlds)}; keep one set")
    world = worlds.pop()
    missing = sorted(set(range(world)) - set(found))
    if missing:
        raise FP8LMError(f"{prefix}: world size {world} but ranks {missing} have no measurement file")
    return {rank: base for rank, (_, base) in found.items()}


ROW_PARALLEL = ("o_proj", "down_proj")       # the Llama family's row-parallel Linears (input split)
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # lm_head is replicated


def _sharded(name: str, key: str) -> bool:
    """Whether `name`'s per-channel `key` ("inputs", "outputs", "weight") is split across ranks."""
    leaf = name.rpartition(".")[2]
    if leaf in ROW_PARALLEL:
        return key == "inputs"
    return leaf in COLUMN_PARALLEL and key in ("outputs", "weight")


def _merge(arrays: list[np.ndarray], sharded: bool) -> np.ndarray:
    seen = [a for a in arrays if a.size]          # a rank that never ran a module observed nothing
    arrays = seen or arrays[:1]
    if sharded and arrays[0].size > 1:
        return np.concatenate(arrays, axis=0)
    if any(a.shape != arrays[0].shape for a in arrays):
        raise FP8LMError(f"per-rank arrays of shapes {[a.shape for a in arrays]} cannot be merged")
    return np.maximum.reduce(arrays)


def merge_nodes(payloads: list[dict]) -> dict:
    names = list(payloads[0]["Nodes"])
    for p in payloads[1:]:
        if set(p["Nodes"]) != set(names):
            raise FP8LMError("per-rank measurement files list different modules; they do not come from one run")
    merged = {}
    for name in names:
        nodes = [p["Nodes"][name] for p in payloads]
        out = {}
        for key in ("inputs", "outputs"):
            if key in nodes[0]:
                out[key] = [_merge([n[key][i] for n in nodes], _sharded(name, key)) for i in range(len(nodes[0][key]))]
        if "params" in nodes[0]:
            out["params"] = {k: _merge([n["params"][k] for n in nodes], _sharded(name, k)) for k in nodes[0]["params"]}
        merged[name] = out
    return merged


def unify_measurements(prefix: Path, target_world_size: int, output_prefix: Path | None = None,
                       observer: str = "maxabs") -> list[Path]:
    ranks = find_rank_files(prefix, observer)
    world = len(ranks)
    if target_world_size < 1 or world % target_world_size:
        raise FP8LMError(f"cannot unify {world} ranks into {target_world_size}: the source world size must be "
                         f"a multiple of the target")
    group = world // target_world_size
    output_prefix = Path(output_prefix or prefix)
    written = []
    for new_rank in range(target_world_size):
        payloads = [read_files(ranks[r]) for r in range(new_rank * group, (new_rank + 1) * group)]
        metadata = {**payloads[0].get("Fp8lmMetadata", {}), "rank": new_rank, "world_size": target_world_size,
                    "unified_from_world_size": world}
        num_samples = max(p.get("NumSamples", 0) for p in payloads)
        payload = file_payload(merge_nodes(payloads), payloads[0].get("Mode", "DynamicRange"), new_rank,
                               target_world_size, num_samples, metadata)
        # Named _<rank>_<world> even for world 1, with rank -1 inside, as INC's unify script writes them.
        payload["GlobalRank"] = payload["LocalRank"] = new_rank if target_world_size > 1 else -1
        base = Path(f"{output_prefix}_hooks_{observer}_{new_rank}_{target_world_size}")
        written.extend(write_files(base, payload))
    return written
