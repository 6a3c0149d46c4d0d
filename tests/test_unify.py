"""unify-measurements on synthetic per-rank files: element-wise maxima, INC's file names."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fp8lm.errors import FP8LMError
from fp8lm.quant.measure_files import file_payload, read_files, write_files
from fp8lm.quant.unify import unify_measurements

NODES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.attn.softmax")


def rank_values(rank):
    # Distinct, hand-checkable values: input = 1 + rank * 0.5 then reversed so the max moves around.
    return {"q_in": [3.0, 1.0, 4.0, 1.5][rank], "q_w": [0.2, 0.7, 0.1, 0.3][rank],
            "sm_in": [9.0, 2.0, 5.0, 8.0][rank], "sm_out": [0.5, 0.9, 0.25, 1.0][rank]}


def write_rank(prefix, rank, world=4):
    v = rank_values(rank)
    nodes = {NODES[0]: {"inputs": [np.array([[v["q_in"]]])], "params": {"weight": np.array([[v["q_w"]]])}},
             NODES[1]: {"inputs": [np.array([[v["sm_in"]]])], "outputs": [np.array([[v["sm_out"]]])]}}
    write_files(f"{prefix}_hooks_maxabs_{rank}_{world}", file_payload(nodes, "DynamicRange", rank, world, 10,
                                                                       {"device": "cpu"}))


@pytest.fixture
def four_ranks(tmp_path):
    prefix = tmp_path / "inc_output"
    for r in range(4):
        write_rank(prefix, r)
    return prefix


def test_four_to_two(four_ranks):
    unify_measurements(four_ranks, 2, four_ranks.parent / "two")
    r0 = read_files(four_ranks.parent / "two_hooks_maxabs_0_2")
    r1 = read_files(four_ranks.parent / "two_hooks_maxabs_1_2")
    assert r0["Nodes"][NODES[0]]["inputs"][0][0][0] == 3.0 and r0["Nodes"][NODES[0]]["params"]["weight"][0][0] == 0.7
    assert r1["Nodes"][NODES[0]]["inputs"][0][0][0] == 4.0 and r1["Nodes"][NODES[0]]["params"]["weight"][0][0] == 0.3
    assert r0["Nodes"][NODES[1]]["inputs"][0][0][0] == 9.0 and r1["Nodes"][NODES[1]]["outputs"][0][0][0] == 1.0
    assert (r0["LocalRank"], r1["LocalRank"]) == (0, 1)
    assert r1["Fp8lmMetadata"]["world_size"] == 2 and r1["Fp8lmMetadata"]["unified_from_world_size"] == 4
    assert (four_ranks.parent / "two_hooks_maxabs_1_2.npz").is_file()
    assert json.loads((four_ranks.parent / "two_hooks_maxabs_0_2_mod_list.json").read_text()) == list(NODES)


def test_four_to_one_via_cli(four_ranks):
    result = subprocess.run([sys.executable, "-m", "fp8lm", "unify-measurements", "--input", str(four_ranks),
                             "--target-world-size", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    one = read_files(f"{four_ranks}_hooks_maxabs_0_1")
    assert one["Nodes"][NODES[0]]["inputs"][0][0][0] == 4.0
    assert one["Nodes"][NODES[0]]["params"]["weight"][0][0] == 0.7
    assert one["Nodes"][NODES[1]]["inputs"][0][0][0] == 9.0 and one["Nodes"][NODES[1]]["outputs"][0][0][0] == 1.0
    assert one["LocalRank"] == -1


def test_bad_targets(four_ranks, tmp_path):
    with pytest.raises(FP8LMError, match="multiple"):
        unify_measurements(four_ranks, 3)
    (tmp_path / "inc_output_hooks_maxabs_2_4.json").unlink()
    with pytest.raises(FP8LMError, match=r"ranks \[2\]"):
        unify_measurements(four_ranks, 2)
    with pytest.raises(FP8LMError, match="no per-rank"):
        unify_measurements(tmp_path / "nothing", 1)
