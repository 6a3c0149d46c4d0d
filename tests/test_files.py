"""What fp8lm trusts on disk and how it writes: a cache that is not the user's own is refused, and
a write that fails part way leaves the previous files whole and no temporary files behind."""
import json
import os

import numpy as np
import pytest

from fp8lm.errors import FP8LMError
from fp8lm.files import check_private, replace_durably


def test_a_folder_others_can_write_is_refused(tmp_path):
    check_private(tmp_path, "the cache")
    tmp_path.chmod(0o777)
    with pytest.raises(FP8LMError, match=r"mode 0o777.*FP8LM_CACHE"):
        check_private(tmp_path, "the cache")
    tmp_path.chmod(0o775)
    with pytest.raises(FP8LMError, match="mode 0o775"):
        check_private(tmp_path, "the cache")


def test_a_planted_model_folder_in_the_cache_is_refused(tmp_path, monkeypatch):
    from fp8lm.model.registry import resolve_model

    cached = tmp_path / "smollm2-135m-instruct"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    cached.chmod(0o777)
    monkeypatch.setenv("FP8LM_CACHE", str(tmp_path))
    with pytest.raises(FP8LMError, match="cached model folder"):
        resolve_model("smollm2-135m-instruct")


def test_kernels_are_not_loaded_from_a_build_folder_others_can_write(tmp_path):
    from fp8lm.fp8 import cpu_kernels as ck

    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(FP8LMError, match="CPU kernels' build folder"):
        ck._build(cache)


def test_measurement_files_survive_a_failed_write(tmp_path, monkeypatch):
    from fp8lm.quant import measure_files

    base = tmp_path / "inc_output_hooks_maxabs"
    old = {"GlobalRank": None, "LocalRank": None, "Mode": "DynamicRange", "Nodes": {"a": {"inputs": [1.0]}}}
    measure_files.write_files(base, old, backup=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", crash)
    new = {**old, "Nodes": {"a": {"inputs": [2.0]}}}
    with pytest.raises(FP8LMError, match="No space left"):
        measure_files.write_files(base, new, backup=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before      # old files whole, no temps
    assert json.loads((tmp_path / "inc_output_hooks_maxabs.json").read_text())["Nodes"]["a"]["inputs"] == [1.0]


def test_replace_durably_moves_every_file_and_leaves_no_temporaries(tmp_path):
    pairs = []
    for name in ("a", "b"):
        temp = tmp_path / f".{name}.tmp"
        temp.write_text(name)
        pairs.append((temp, tmp_path / name))
    replace_durably(pairs)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"] and (tmp_path / "b").read_text() == "b"
