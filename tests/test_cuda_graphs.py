"""Decode steps padded to CUDA-graph buckets (engine/cuda_graphs.py). Without a GPU the padded step
runs eagerly: the same buffers, metadata and padding rows a captured graph replays, checked against
the unpadded engine on the same prompts."""
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.engine.cuda_graphs import DecodeGraphs, graph_buckets
from fp8lm.engine.llm_engine import LLMEngine

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (3, 9, 17, 30, 41)]


def test_buckets_follow_vllms_spacing():
    assert graph_buckets(1) == [1]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


def run(model, monkeypatch=None):
    llm = LLM(str(model), max_model_len=96, max_num_seqs=8, skip_warmup=True, kv_cache_memory=1 << 20)
    # Sequences finish one after another: decode batches of 5, 4, 3, 2 and 1 (buckets 8, 4, 4, 2, 1).
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=1) for i in range(5)]
    return llm, llm.generate(PROMPTS, params, use_tqdm=False)


def test_padded_decode_steps_equal_the_unpadded_engine(tiny_model, monkeypatch):
    eager, expected = run(tiny_model)
    assert eager.engine.runner.graphs is None                  # the CPU default: no graphs
    monkeypatch.setattr(LLMEngine, "_wants_decode_graphs", lambda self: True)
    calls = []
    real_run = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, ids, pos, meta: calls.append(ids.shape[0]) or real_run(self, ids, pos, meta))
    padded, outputs = run(tiny_model)
    runner = padded.engine.runner
    assert sorted(runner.graphs.steps) == [1, 2, 4, 8]
    # The scratch block is past the block manager's blocks: no sequence can own it.
    assert padded.engine.block_manager.num_blocks == runner.num_blocks
    assert padded.engine.host.model.attention_layers()[0].k_cache_tensor.shape[1] == runner.num_blocks + 1
    assert set(calls) == {5, 4, 3, 2, 1}
    for a, b in zip(expected, outputs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # Only the float32 summation order of wider matmuls differs.
        assert abs(a.outputs[0].cumulative_logprob - b.outputs[0].cumulative_logprob) < 1e-4


def test_a_hooked_model_decodes_unpadded(tiny_model, monkeypatch):
    """A replayed graph would run no hooks: with one registered the step stays eager."""
    monkeypatch.setattr(LLMEngine, "_wants_decode_graphs", lambda self: True)
    llm = LLM(str(tiny_model), max_model_len=96, max_num_seqs=8, skip_warmup=True, kv_cache_memory=1 << 20)
    seen = []
    llm.engine.host.model.model.norm.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    calls = []
    monkeypatch.setattr(DecodeGraphs, "run", lambda *a: calls.append(1))
    llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert not calls and seen == [3, 1, 1]
