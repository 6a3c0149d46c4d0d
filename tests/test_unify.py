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


def test_per_channel_tp2_unified_equals_tp1(tiny_model, tmp_path):
    """maxabs_per_channel measured on 2 ranks and unified into 1 gives what one rank measures: weight
    rows of column-parallel Linears and input features of row-parallel ones are concatenated
    (they are the split channels), everything else is the maximum over ranks."""
    from fp8lm import LLM, SamplingParams

    prompts = [[5, 9, 14, 3, 27, 41, 8], [60, 2, 33, 19]]

    def measure(prefix, tp):
        llm = LLM(str(tiny_model), quantization="inc", max_model_len=64, tensor_parallel_size=tp, skip_warmup=True,
                  quant_config={"mode": "MEASURE", "observer": "maxabs_per_channel", "dump_stats_path": str(prefix)})
        try:
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
            llm.finalize_calibration()
        finally:
            llm.engine.shutdown()

    measure(tmp_path / "one", 1)
    measure(tmp_path / "two", 2)
    unify_measurements(tmp_path / "two", 1, observer="maxabs_per_channel")
    one = read_files(tmp_path / "one_hooks_maxabs_per_channel")["Nodes"]
    unified = read_files(tmp_path / "two_hooks_maxabs_per_channel_0_1")["Nodes"]
    assert set(one) == set(unified)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert one[q]["params"]["weight"].shape == (64, 1) and one[o]["inputs"][0].shape == (128, 1)
    for name, node in one.items():
        for key in ("inputs", "outputs"):
            for a, b in zip(node.get(key, []), unified[name].get(key, [])):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
        for key, a in node.get("params", {}).items():
            np.testing.assert_array_equal(unified[name]["params"][key], a, err_msg=f"{name} {key}")
