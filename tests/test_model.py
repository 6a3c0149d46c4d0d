"""fp8lm's Llama against transformers' LlamaForCausalLM on tiny random configs (float32)."""
import pytest
import torch

from fp8lm.model.loader import load_model
from reference import full_logits
from conftest import make_tiny_llama

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "llama3-rope": dict(rope_parameters=LLAMA3_ROPE),
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    from transformers import LlamaForCausalLM

    folder = make_tiny_llama(tmp_path / case, seed=len(case), **CASES[case])
    ref_model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 98, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    ours = full_logits(load_model(folder, torch.float32), ids)
    assert ref.std() > 0.1, "reference logits are too flat to make the comparison meaningful"
    assert (ours - ref).abs().max().item() < 1e-4


def test_sharded_checkpoint_loads_identically(tmp_path):
    whole = make_tiny_llama(tmp_path / "whole", seed=3)
    sharded = make_tiny_llama(tmp_path / "sharded", seed=3, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = list(range(3, 40))
    a = full_logits(load_model(whole, torch.float32), ids)
    b = full_logits(load_model(sharded, torch.float32), ids)
    assert torch.equal(a, b)
