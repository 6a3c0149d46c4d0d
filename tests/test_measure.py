"""MEASURE mode on a tiny Llama: which modules, what values, the files, determinism."""
import json

import numpy as np
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.errors import FP8LMError
from fp8lm.quant.measure_files import read_files

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (5, 17, 33, 9)]


def measure(model_dir, out_prefix, prompts=PROMPTS, max_tokens=4, **cfg):
    config = {"mode": "MEASURE", "observer": "maxabs", "dump_stats_path": str(out_prefix), **cfg}
    llm = LLM(str(model_dir), quantization="inc", quant_config=config, max_model_len=64)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    llm.finalize_calibration()
    return json.loads((out_prefix.parent / f"{out_prefix.name}_hooks_{config['observer']}.json").read_text())


def test_nodes_cover_every_quantizable_module(tiny_model, tmp_path):
    data = measure(tiny_model, tmp_path / "m")
    nodes = data["Nodes"]
    for layer in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            node = nodes[f"model.layers.{layer}.{name}"]
            assert len(node["inputs"]) == 1 and "weight" in node["params"] and "outputs" not in node
        attn = f"model.layers.{layer}.self_attn.attn."
        assert len(nodes[attn + "matmul_qk"]["inputs"]) == 2 and len(nodes[attn + "matmul_av"]["inputs"]) == 2
        assert "outputs" in nodes[attn + "softmax"]           # softmax always records its output
        assert len(nodes[attn + "k_cache"]["inputs"]) == 1 and len(nodes[attn + "v_cache"]["inputs"]) == 1
    assert "lm_head" in nodes
    values = [v for n in nodes.values() for group in ("inputs", "outputs") for v in n.get(group, [])]
    assert all(np.isfinite(v).all() and np.asarray(v).min() > 0 for v in values)
    assert all(0 < n["outputs"][0][0][0] <= 1.0 for k, n in nodes.items() if k.endswith("softmax"))
    meta = data["Fp8lmMetadata"]
    assert meta["device"] == "cpu" and meta["compute_dtype"] == "float32"
    assert meta["num_samples"] == 4 and meta["num_tokens"] == sum(len(p) for p in PROMPTS) + 4 * 3
    assert meta["model"]["weights_checksum"] and meta["model"]["config_sha256"]
    assert meta["fp8lm_version"] and meta["time"]
    assert data["Mode"] == "DynamicRange" and data["LocalRank"] is None


def test_values_against_transformers(tiny_model, tmp_path):
    """Weights from the checkpoint; v_cache inputs are the v_proj outputs; k_cache the rotated k_proj outputs."""
    from transformers import LlamaForCausalLM

    data = measure(tiny_model, tmp_path / "m", max_tokens=1, measure_exclude="NONE")["Nodes"]
    ref = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    seen = {}

    def keep(name):
        return lambda mod, args, out: seen.setdefault(name, []).append(out.detach().abs().amax())

    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.v_proj.register_forward_hook(keep(f"v{i}"))
    with torch.no_grad():
        for p in PROMPTS:
            ref(torch.tensor([p]))
    for i, layer in enumerate(ref.model.layers):
        w = layer.self_attn.q_proj.weight.abs().max().item()
        assert data[f"model.layers.{i}.self_attn.q_proj"]["params"]["weight"][0][0] == pytest.approx(w, rel=1e-6)
        v_max = max(seen[f"v{i}"]).item()
        assert data[f"model.layers.{i}.self_attn.attn.v_cache"]["inputs"][0][0][0] == pytest.approx(v_max, rel=1e-5)
        assert data[f"model.layers.{i}.self_attn.v_proj"]["outputs"][0][0][0] == pytest.approx(v_max, rel=1e-5)


def test_measuring_twice_gives_identical_files(tiny_model, tmp_path):
    a = measure(tiny_model, tmp_path / "a" / "m")
    b = measure(tiny_model, tmp_path / "b" / "m")
    for d in (a, b):
        d["Fp8lmMetadata"].pop("time")
    assert a == b
    assert (tmp_path / "a" / "m_hooks_maxabs.npz").read_bytes() != b""


def test_existing_files_are_backed_up(tiny_model, tmp_path):
    measure(tiny_model, tmp_path / "m")
    first = (tmp_path / "m_hooks_maxabs.json").read_text()
    measure(tiny_model, tmp_path / "m", prompts=PROMPTS[:1])
    backups = sorted(p.name for p in tmp_path.glob("backup_*"))
    assert len(backups) == 3 and any(b.endswith("m_hooks_maxabs.json") for b in backups)
    backup_json = next(p for p in tmp_path.glob("backup_*m_hooks_maxabs.json"))
    assert backup_json.read_text() == first
    assert read_files(tmp_path / "m_hooks_maxabs")["NumSamples"] == 1


def test_blocklist_and_measure_exclude(tiny_model, tmp_path):
    nodes = measure(tiny_model, tmp_path / "m", blocklist={"names": ["lm_head"], "types": ["Matmul"]},
                    measure_exclude="PARAMS")["Nodes"]
    assert "lm_head" not in nodes and not any(k.endswith("matmul_qk") for k in nodes)
    assert all("params" not in n for n in nodes.values())
    assert "model.layers.0.self_attn.attn.softmax" in nodes


def test_per_channel_observer_shapes(tiny_model, tmp_path):
    nodes = measure(tiny_model, tmp_path / "m", observer="maxabs_per_channel")["Nodes"]
    q = nodes["model.layers.0.self_attn.q_proj"]
    assert np.asarray(q["params"]["weight"]).shape == (64, 1)      # output channels of q_proj
    assert np.asarray(q["inputs"][0]).shape == (64, 1)             # hidden features


def test_observer_state_does_not_grow(tiny_model, tmp_path):
    llm = LLM(str(tiny_model), quantization="inc", max_model_len=64,
              quant_config={"mode": "MEASURE", "dump_stats_path": str(tmp_path / "m")})
    llm.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    for node in llm.engine.host.measurement.nodes.values():
        assert all(o.value.numel() == 1 for o in node.inputs + node.outputs)
    llm.engine.discard_measurement()


def test_fp8_kv_without_inc_and_unknown_quantization_are_refused(tiny_model, tmp_path):
    with pytest.raises(FP8LMError, match="kv_cache_dtype='fp8_inc' needs quantization='inc'"):
        LLM(str(tiny_model), kv_cache_dtype="fp8_inc")
    with pytest.raises(FP8LMError, match="quantization='gptq'"):
        LLM(str(tiny_model), quantization="gptq")


def test_unwritable_dump_path_is_reported(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FP8LMError, match="'dump_stats_path'.*not writable"):
        LLM(str(tiny_model), quantization="inc", max_model_len=64,
            quant_config={"mode": "MEASURE", "dump_stats_path": str(blocker / "sub" / "m")})
