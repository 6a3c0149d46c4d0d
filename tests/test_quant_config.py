"""QUANT_CONFIG files of the INC flow (written here from the research note) and their errors."""
import json
import logging

import pytest

from fp8lm.errors import FP8LMError
from fp8lm.quant.config import load_quant_config

INC_EXAMPLES = {
    "maxabs_measure.json": {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs",
                            "dump_stats_path": "./hqt_output/measure"},
    "maxabs_measure_include_outputs.json": {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs",
                                            "measure_exclude": "NONE", "dump_stats_path": "./hqt_output/measure"},
    "maxabs_quant.json": {"method": "HOOKS", "mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
                          "dump_stats_path": "./hqt_output/measure"},
    "maxabs_quant_g2.json": {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
                             "allowlist": {"types": [], "names": []},
                             "blocklist": {"types": [], "names": ["lm_head", "mlp\\.gate\\b"]},
                             "dump_stats_path": "/data/g2/inc_output", "device_for_scales": "GAUDI2"},
    "maxabs_quant_mixtral.json": {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
                                  "scale_format": "CONST", "blocklist": {"names": ["self_attn", "lm_head"]},
                                  "dump_stats_path": "./inc_output"},
    "maxabs_quant_dynamic.json": {"mode": "QUANTIZE", "scale_method": "ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW",
                                  "dynamic_quantization": True, "scale_format": "const",
                                  "blocklist": {"types": ["Matmul", "B2BMatmul", "KVCache", "VLLMKVCache"]}},
    "legacy_whitelist.json": {"mode": "QUANTIZE", "whitelist": {"types": ["Linear"]},
                              "blacklist": {"names": ["lm_head"]}, "quantize_weight": False,
                              "scale_params": {"input_backoff": 0.25, "weight_backoff": 0.5}},
    "dict_scale_method.json": {"mode": "QUANTIZE", "scale_method": {
        "default": {"weight": {"granularity": "PCS", "rounding_method": "POW2", "backoff": 0.5},
                    "activation": {"rounding_method": "HW_ALIGNED", "backoff": 0.25}},
        "layers": {"0": "unit_scale"},
        "layer_types": {"Matmul": {"activation": {"rounding_method": "POW2"}}},
        "nodes": {"lm_head": "maxabs_arbitrary"}}},
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("name", INC_EXAMPLES)
def test_inc_examples_parse(tmp_path, name, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_quant_config(write(tmp_path, name, INC_EXAMPLES[name]))
    assert cfg.mode == INC_EXAMPLES[name]["mode"]
    assert "unknown keys" not in caplog.text   # legacy keys such as "method" are accepted silently


def test_values_are_read(tmp_path):
    g2 = load_quant_config(write(tmp_path, "g2.json", INC_EXAMPLES["maxabs_quant_g2.json"]))
    assert g2.device_for_scales == "GAUDI2" and g2.scale_method.name == "maxabs_hw"
    assert not g2.should_quantize("lm_head", ("Linear",))
    assert not g2.should_quantize("model.layers.3.mlp.gate", ("Linear",))
    assert g2.should_quantize("model.layers.3.mlp.gate_proj", ("Linear",))   # \b: gate_proj is not 'gate'
    legacy = load_quant_config(write(tmp_path, "l.json", INC_EXAMPLES["legacy_whitelist.json"]))
    assert legacy.should_quantize("model.layers.0.self_attn.q_proj", ("Linear", "ColumnParallelLinear"))
    assert not legacy.should_quantize("model.layers.0.self_attn.attn.matmul_qk", ("Matmul",))
    assert not legacy.should_quantize("lm_head", ("Linear",))
    include = load_quant_config(write(tmp_path, "i.json", INC_EXAMPLES["maxabs_measure_include_outputs.json"]))
    assert include.measures_outputs() and include.measures_inputs() and include.measures_params()


def test_dict_scale_method_resolution_order(tmp_path):
    cfg = load_quant_config(write(tmp_path, "d.json", INC_EXAMPLES["dict_scale_method.json"]))
    sm = cfg.scale_method
    assert sm.for_node("lm_head", ("Linear",)).weight.backoff == 0.5                      # node: maxabs_arbitrary
    assert sm.for_node("lm_head", ("Linear",)).weight.rounding == "IDENTITY"
    assert sm.for_node("model.layers.0.mlp.up_proj", ("Linear",)).weight.rounding == "SCALE_UNIT"   # layer 0
    assert sm.for_node("model.layers.1.self_attn.attn.matmul_qk", ("Matmul",)).activation.rounding == "POW2"
    default = sm.for_node("model.layers.1.mlp.up_proj", ("Linear",))
    assert (default.weight.granularity, default.weight.rounding, default.activation.rounding) == ("PCS", "POW2", "HW_ALIGNED")


def test_unknown_keys_warn_once_naming_them(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_quant_config(write(tmp_path, "u.json", {"mode": "MEASURE", "colour": 1, "flavour": 2}))
    lines = [r.getMessage() for r in caplog.records if "unknown keys" in r.getMessage()]
    assert len(lines) == 1 and "colour" in lines[0] and "flavour" in lines[0]


BAD = [
    ({"mode": "MEASUR"}, ["'mode'", "'MEASUR'", "MEASURE, QUANTIZE, LOAD, AUTO"]),
    ({"observer": "minmax"}, ["'observer'", "'minmax'", "maxabs_per_channel"]),
    ({"scale_method": "maxabs_hww"}, ["'scale_method'", "'maxabs_hww'", "maxabs_hw"]),
    ({"fp8_config": "E3M4"}, ["'fp8_config'", "'E3M4'", "E4M3, E5M2"]),
    ({"hp_dtype": "INT8"}, ["'hp_dtype'", "'INT8'", "BF16"]),
    ({"measure_exclude": "SOME"}, ["'measure_exclude'", "'SOME'", "OUTPUT"]),
    ({"scale_format": "FLOAT"}, ["'scale_format'", "'FLOAT'", "CONST, SCALAR"]),
    ({"device_for_scales": "GAUDI9"}, ["'device_for_scales'", "'GAUDI9'", "GAUDI2"]),
    ({"blocklist": {"names": ["lm_head("]}}, ["blocklist.names", "lm_head("]),
    ({"allowlist": ["Linear"]}, ["'allowlist'"]),
    ({"use_qdq": "maybe"}, ["'use_qdq'", "'maybe'", "true, false"]),
    ({"scale_method": {"default": {"weight": {"rounding_method": "CEIL"}}}}, ["rounding_method", "'CEIL'", "POW2"]),
    ({"scale_method": {"default": {"weight": {"backoff": 2}}}}, ["backoff", "2"]),
    ({"calibration_sample_interval": -1}, ["calibration_sample_interval", "-1"]),
]


@pytest.mark.parametrize("data,needles", BAD, ids=[str(list(d)[0]) for d, _ in BAD])
def test_invalid_values_name_key_value_and_choices(tmp_path, data, needles):
    path = write(tmp_path, "bad.json", data)
    with pytest.raises(FP8LMError) as e:
        load_quant_config(path)
    for needle in needles:
        assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_invalid_json_says_line_and_column(tmp_path):
    path = write(tmp_path, "broken.json", '{\n  "mode": "MEASURE",\n  "observer": maxabs\n}')
    with pytest.raises(FP8LMError, match=r"line 3 column 15"):
        load_quant_config(path)


def test_missing_file_and_missing_env(tmp_path, monkeypatch):
    with pytest.raises(FP8LMError, match="no such file"):
        load_quant_config(tmp_path / "nope.json")
    monkeypatch.delenv("QUANT_CONFIG", raising=False)
    with pytest.raises(FP8LMError, match="QUANT_CONFIG"):
        load_quant_config(None)
    monkeypatch.setenv("QUANT_CONFIG", str(write(tmp_path, "env.json", {"mode": "MEASURE"})))
    assert load_quant_config(None).mode == "MEASURE"
