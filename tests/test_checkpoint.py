"""Quantized checkpoints: write, reload with neither QUANT_CONFIG nor measurements, same outputs."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import measure_tiny
from fp8lm import LLM, SamplingParams
from fp8lm.entrypoints.quantize import quantize_to_folder
from fp8lm.errors import FP8LMError, ModelLoadError
from fp8lm.quant.fp8_linear import is_fp8
from fp8lm.quant.fp8_modules import FP8KVCache

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (6, 19, 31)]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def quant_config(tiny_model, tmp_path_factory):
    prefix = measure_tiny(tiny_model, tmp_path_factory.mktemp("ckpt-measure") / "inc_output", PROMPTS)
    return {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(prefix)}


@pytest.fixture(scope="module")
def saved(tiny_model, quant_config, tmp_path_factory):
    return quantize_to_folder(str(tiny_model), tmp_path_factory.mktemp("ckpt") / "fp8", quant_config)


def test_round_trip_outputs_identical(tiny_model, quant_config, saved):
    in_memory = LLM(str(tiny_model), quantization="inc", quant_config=quant_config, kv_cache_dtype="fp8_inc",
                    max_model_len=64, skip_warmup=True)
    reloaded = LLM(str(saved), max_model_len=64, skip_warmup=True)
    assert is_fp8(reloaded.engine.host.model.lm_head)
    assert isinstance(reloaded.engine.host.model.model.layers[0].self_attn.attn.k_cache, FP8KVCache)
    for a, b in zip(in_memory.generate(PROMPTS, PARAMS, use_tqdm=False), reloaded.generate(PROMPTS, PARAMS, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob


def test_folder_layout_follows_compressed_tensors(saved):
    config = json.loads((saved / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "float-quantized")
    group = q["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "tensor" and group["weights"]["type"] == "float"
    assert group["input_activations"] == {**group["input_activations"], "strategy": "tensor", "dynamic": False}
    assert q["kv_cache_scheme"]["strategy"] == "tensor"
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
        assert w.dtype == torch.float8_e4m3fn and s.shape == (1,)
    assert {"model.layers.1.self_attn.k_scale", "model.layers.1.self_attn.v_scale",
            "model.layers.1.mlp.down_proj.input_scale"} <= names
    sidecar = json.loads((saved / "fp8lm_quant.json").read_text())
    assert "model.layers.0.self_attn.attn.matmul_qk" in sidecar["attention_scales"]
    assert sidecar["provenance"]["measurement"]["device"] == "cpu"
    assert sidecar["provenance"]["scale_method"] == "maxabs_hw"


def test_value_convention_is_fp8_times_scale(tiny_model, saved):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.up_proj.weight").float() * f.get_tensor("model.layers.1.mlp.up_proj.weight_scale")
    original = ref.model.layers[1].mlp.up_proj.weight
    assert (w - original).abs().max() <= original.abs().max() / 16   # within E4M3's relative spacing


def test_unsupported_scheme_is_refused(saved, tmp_path):
    import shutil

    bad = tmp_path / "int4"
    shutil.copytree(saved, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4, strategy="group")
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"layer model\.layers\.0\.self_attn\.q_proj: scheme \(weights int4 group"):
        LLM(str(bad), max_model_len=64, skip_warmup=True)


def test_quantized_folder_refuses_quantization_flag(saved, quant_config):
    with pytest.raises(FP8LMError, match="already quantized"):
        LLM(str(saved), quantization="inc", quant_config=quant_config, max_model_len=64)


def test_quantize_cli_refuses_nonempty_output(tiny_model, tmp_path):
    (tmp_path / "x").write_text("")
    r = subprocess.run([sys.executable, "-m", "fp8lm", "quantize", str(tiny_model), "--output", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not an empty folder" in r.stderr
