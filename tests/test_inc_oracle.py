"""Intel Neural Compressor itself as the oracle (neural-compressor-pt on the CPU, "use_qdq": true,
Linear modules only): same file names, same node names, same maxima; each side reads the other's files."""
import json

import pytest
import torch

from fp8lm import LLM, SamplingParams

pytestmark = pytest.mark.slow

INPUTS = torch.randint(3, 90, (3, 24), generator=torch.Generator().manual_seed(0))


def inc_run(model_dir, config: dict, path):
    """Runs INC prepare (MEASURE) or convert (QUANTIZE) on transformers' model of the same folder."""
    from neural_compressor.torch.quantization import FP8Config, convert, finalize_calibration, prepare
    from transformers import LlamaForCausalLM

    path.write_text(json.dumps({"use_qdq": True, "hp_dtype": "FP32", **config}))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = FP8Config.from_json_file(str(path))
    if config["mode"] == "MEASURE":
        model = prepare(model, cfg)
        with torch.no_grad():
            model(INPUTS)
        finalize_calibration(model)
    else:
        model = convert(model, cfg)
    return model


def fp8lm_measure(model_dir, prefix):
    llm = LLM(str(model_dir), quantization="inc", max_model_len=64,
              quant_config={"mode": "MEASURE", "observer": "maxabs", "dump_stats_path": str(prefix)})
    # prompt_logprobs makes the LM head see every position, as transformers' forward does.
    llm.generate([r.tolist() for r in INPUTS], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    llm.finalize_calibration()


@pytest.fixture(scope="module")
def both_measured(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    inc_run(tiny_model, {"mode": "MEASURE", "observer": "maxabs", "dump_stats_path": str(root / "inc" / "out")},
            root / "inc_measure.json")
    fp8lm_measure(tiny_model, root / "ours" / "out")
    return root


def test_same_file_names(both_measured):
    names = lambda d: sorted(p.name for p in d.iterdir())   # noqa: E731
    assert names(both_measured / "inc") == names(both_measured / "ours") == [
        "out_hooks_maxabs.json", "out_hooks_maxabs.npz", "out_hooks_maxabs_mod_list.json"]


def test_same_linear_nodes_and_maxima(both_measured):
    inc = json.loads((both_measured / "inc" / "out_hooks_maxabs.json").read_text())["Nodes"]
    ours = json.loads((both_measured / "ours" / "out_hooks_maxabs.json").read_text())["Nodes"]
    assert set(inc) == {k for k in ours if not k.split(".")[-1] in ("matmul_qk", "matmul_av", "softmax",
                                                                    "k_cache", "v_cache")}
    for name, node in inc.items():
        assert ours[name]["inputs"][0][0][0] == pytest.approx(node["inputs"][0][0][0], rel=1e-5), name
        assert ours[name]["params"]["weight"][0][0] == pytest.approx(node["params"]["weight"][0][0], rel=1e-6), name


def test_inc_quantize_accepts_fp8lm_measurements(both_measured, tiny_model):
    model = inc_run(tiny_model, {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_pow2",
                                 "dump_stats_path": str(both_measured / "ours" / "out")},
                    both_measured / "inc_quant.json")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "PatchedLinear" and q.weight.dtype == torch.float8_e4m3fn
    assert (both_measured / "ours" / "out_hooks_maxabs_MAXABS_POW2.json").is_file()


@pytest.mark.parametrize("method", ["maxabs_pow2", "maxabs_arbitrary", "unit_scale"])
def test_same_linear_outputs_as_inc_quantize(both_measured, tiny_model, method, caplog):
    """fp8lm QUANTIZE reads INC's measurement file; both quantized models' Linears agree."""
    prefix = both_measured / "inc" / "out"
    inc_model = inc_run(tiny_model, {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": method,
                                     "dump_stats_path": str(prefix)}, both_measured / f"inc_{method}.json")
    ours = LLM(str(tiny_model), quantization="inc", max_model_len=64, skip_warmup=True,
               quant_config={"mode": "QUANTIZE", "scale_method": method, "dump_stats_path": str(prefix),
                             # INC measures Linears only on the CPU
                             "blocklist": {"types": ["Matmul", "Softmax"]}})
    assert "no fp8lm metadata" in caplog.text or method == "unit_scale"
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 2
    names = [n for n, m in inc_model.named_modules() if type(m).__name__ == "PatchedLinear"]
    assert len(names) == 15
    for name in names:
        theirs = inc_model.get_submodule(name)
        mine = ours.engine.host.model.get_submodule(name)
        xi = x[:, : mine.in_features] if mine.in_features <= 64 else torch.randn(5, mine.in_features) * 2
        with torch.no_grad():
            expected = theirs(xi)
        assert torch.allclose(mine(xi), expected, rtol=1e-5, atol=1e-5), name
