"""`fp8lm calibrate`: bad input before the model loads; a real calibration of SmolLM2."""
import json
import os
import subprocess
import sys

import pytest

from fp8lm.entrypoints.calibrate import calibrate
from fp8lm.errors import FP8LMError
from fp8lm.quant.dataset import load_samples


def run(*args):
    return subprocess.run([sys.executable, "-m", "fp8lm", "calibrate", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "FP8LM_SKIP_WARMUP": "1"})


def one_error_line(result, *needles):
    assert result.returncode == 2, result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("fp8lm: error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), result.stderr
    assert "loaded" not in result.stderr      # refused before the model loaded


def test_missing_dataset(tmp_path, tiny_model):
    one_error_line(run(str(tiny_model), "--dataset", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")),
                   "none.jsonl", "no such file")


def test_empty_dataset(tmp_path, tiny_model):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    one_error_line(run(str(tiny_model), "--dataset", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "o")),
                   "empty.txt", "no samples")


def test_bad_jsonl_line(tmp_path, tiny_model):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    one_error_line(run(str(tiny_model), "--dataset", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o")),
                   "d.jsonl", "line 2")


def test_unwritable_output(tmp_path, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_error_line(run(str(tiny_model), "--output", str(blocker / "out")), "--output", "not writable")


def test_dataset_formats(tmp_path):
    (tmp_path / "t.txt").write_text("first paragraph\nstill first\n\nsecond one\n")
    assert load_samples(str(tmp_path / "t.txt")) == ["first paragraph\nstill first", "second one"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert load_samples(str(tmp_path / "c.jsonl")) == [[{"role": "user", "content": "hi"}]]
    builtin = load_samples("builtin")
    assert len(builtin) >= 30 and any(isinstance(s, list) for s in builtin) and any("def " in s for s in builtin
                                                                                 if isinstance(s, str))


def test_long_samples_are_truncated_with_a_warning(tmp_path, tiny_model, caplog):
    (tmp_path / "long.txt").write_text("x" * 300 + "\n\nshort")
    result = calibrate(str(tiny_model), str(tmp_path / "long.txt"), tmp_path / "out", max_seq_len=50,
                       max_tokens=2, batch_size=2, use_tqdm=False)
    assert result.num_truncated == 1 and "truncated" in caplog.text
    assert result.measurement_files[0].name == "inc_output_hooks_maxabs.json"


def test_interrupted_calibration_writes_nothing(tmp_path, tiny_model, monkeypatch):
    from fp8lm.entrypoints.llm import LLM

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(str(tiny_model), "builtin", tmp_path / "out", max_tokens=2, num_samples=4, use_tqdm=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_calibration_failing_after_measure_leaves_the_output_folder_as_it_was(tmp_path, tiny_model, monkeypatch):
    """MEASURE has written its files (moving the earlier ones to backup names) when a later step fails:
    the folder is put back as it was, file for file, whether it held an earlier calibration or nothing."""
    from fp8lm.entrypoints import calibrate as calibrate_module

    kw = dict(max_tokens=2, num_samples=4, max_seq_len=40, use_tqdm=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    calibrate(str(tiny_model), "builtin", out, **kw)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "inc_output_hooks_maxabs.json" in before and "maxabs_quant_cpu.json" in before

    def full_disk(*args, **kwargs):
        raise FP8LMError("No space left on device")

    monkeypatch.setattr(calibrate_module, "write_statistics", full_disk)
    with pytest.raises(FP8LMError, match="No space left"):
        calibrate(str(tiny_model), "builtin", out, **{**kw, "num_samples": 3})     # other maxima
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(FP8LMError, match="No space left"):
        calibrate(str(tiny_model), "builtin", tmp_path / "fresh", **kw)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_bad_kernel_choice_stops_calibration_before_any_work(tmp_path, tiny_model, monkeypatch):
    """A bad FP8LM_CPU_KERNELS is refused first, by name, with nothing generated or written (also in a
    process whose kernels were chosen before: that choice is cached)."""
    from fp8lm.entrypoints.llm import LLM

    monkeypatch.setenv("FP8LM_CPU_KERNELS", "sse9")
    monkeypatch.setattr(LLM, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    with pytest.raises(FP8LMError, match="FP8LM_CPU_KERNELS='sse9': allowed values are"):
        calibrate(str(tiny_model), "builtin", tmp_path / "out", max_tokens=2, num_samples=4, use_tqdm=False)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_smollm2_builtin_calibration(smollm2, smollm2_fp8_bfloat16):
    """The run's shared `fp8lm calibrate smollm2 ... --dtype bfloat16` (tests/conftest.py): its files."""
    folder = smollm2_fp8_bfloat16.quant_config.parent
    quant_cfg = json.loads((folder / "maxabs_quant_cpu.json").read_text())
    assert quant_cfg["mode"] == "QUANTIZE" and quant_cfg["dump_stats_path"] == str(folder / "inc_output")
    assert f"QUANT_CONFIG={folder / 'maxabs_quant_cpu.json'}" in smollm2_fp8_bfloat16.stdout
    data = json.loads((folder / "inc_output_hooks_maxabs.json").read_text())
    nodes = data["Nodes"]
    expected = {f"model.layers.{i}.{m}" for i in range(30) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "self_attn.attn.matmul_qk", "self_attn.attn.softmax",
        "self_attn.attn.matmul_av", "self_attn.attn.k_cache", "self_attn.attn.v_cache")} | {"lm_head"}
    assert set(nodes) == expected
    for name, node in nodes.items():
        for v in node["inputs"] + node.get("outputs", []) + list(node.get("params", {}).values()):
            assert 0 < v[0][0] < float("inf"), name
    meta = data["Fp8lmMetadata"]
    assert meta["num_samples"] == 32 and meta["num_tokens"] > 4000 and meta["model"]["name"] == smollm2.name


def test_max_ppl_increase_writes_a_blocklist(tmp_path, tiny_model):
    result = calibrate(str(tiny_model), "builtin", tmp_path / "out", num_samples=6, max_seq_len=40, max_tokens=2,
                       use_tqdm=False, max_ppl_increase=0.0, max_weight_share=1.0)
    cfg = json.loads(result.quant_config.read_text())
    assert cfg["blocklist"]["names"] == ["^lm_head$", *result.blocklist] and result.blocklist
    assert all(n.startswith("model\\.layers\\.") for n in result.blocklist)


def test_a_budget_it_cannot_reach_says_so(tmp_path, tiny_model, caplog):
    """Nothing may be kept (share 0), so FP8's bound stays above a 0% budget: a warning, not silence."""
    with caplog.at_level("WARNING", logger="fp8lm"):
        result = calibrate(str(tiny_model), "builtin", tmp_path / "out", num_samples=6, max_seq_len=40, max_tokens=2,
                           use_tqdm=False, max_ppl_increase=0.0, max_weight_share=0.0)
    assert result.blocklist == []
    assert any("--max-ppl-increase 0.00 not reached" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kw", [dict(max_ppl_increase=-1.0), dict(max_ppl_increase=float("nan")),
                                dict(max_weight_share=1.5), dict(max_attention_share=-0.1)])
def test_a_bad_budget_is_refused_before_anything_runs(tmp_path, tiny_model, kw):
    with pytest.raises(FP8LMError, match="max"):
        calibrate(str(tiny_model), "builtin", tmp_path / "out", num_samples=6, use_tqdm=False, **kw)
    assert not (tmp_path / "out").exists()


def test_short_calibration_text_is_continued_by_the_model():
    """23 tokens missing over 3 prompts: 8 more each where there is room, never fewer than max_tokens;
    sampled (temperature 1, a seed per prompt) through EOS, so that the lengths are what they say."""
    from fp8lm.entrypoints.calibrate import continuation_params

    params = continuation_params([[5, 6, 7], [8, 9], list(range(32))], 60, 2, max_model_len=34)
    assert [p.max_tokens for p in params] == [8, 8, 2]
    assert [p.seed for p in params] == [0, 1, 2] and all(p.temperature == 1.0 and p.ignore_eos for p in params)
    assert [p.max_tokens for p in continuation_params([[5, 6, 7]], 2, 4, max_model_len=34)] == [4]


def test_the_fp8lm_recipe_measures_and_collects_on_the_continued_text(tmp_path, tiny_model):
    """INC's recipe measures the prompts and its greedy max_tokens; fp8lm's measures (and runs its
    statistics pass on) the prompts continued to statistics_tokens."""
    (tmp_path / "short.txt").write_text("\n\n".join(f"sample {i} is short" for i in range(6)))
    kw = dict(max_seq_len=40, max_tokens=2, use_tqdm=False, statistics_tokens=150)
    inc = calibrate(str(tiny_model), str(tmp_path / "short.txt"), tmp_path / "inc", recipe="inc", **kw)
    result = calibrate(str(tiny_model), str(tmp_path / "short.txt"), tmp_path / "out", **kw)
    assert sum(map(len, inc.texts)) < 150 <= sum(map(len, result.texts))
    assert all(t[:len(p)] == p and len(t) > len(p) + 2 for t, p in zip(result.texts, inc.texts))
    for out, texts in (("inc", [p + [0, 0] for p in inc.texts]), ("out", result.texts)):
        data = json.loads((tmp_path / out / "inc_output_hooks_maxabs.json").read_text())
        assert data["Fp8lmMetadata"]["num_tokens"] == sum(map(len, texts)) - len(texts)   # the last is not run


def test_a_negative_statistics_token_count_is_refused(tmp_path, tiny_model):
    with pytest.raises(FP8LMError, match="--statistics-tokens"):
        calibrate(str(tiny_model), "builtin", tmp_path / "out", num_samples=6, use_tqdm=False, statistics_tokens=-1)
    assert not (tmp_path / "out").exists()
