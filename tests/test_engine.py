"""The engine on a tiny random Llama: batching exactness, preemption, sampling semantics."""
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.errors import FP8LMError
from fp8lm.model.loader import load_model
from reference import full_logits


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (n,), generator=g).tolist()
    return [torch.randint(3, 98, (n_,), generator=g).tolist() for n_ in lengths]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), max_model_len=128, skip_warmup=True)


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_continuous_batching_is_exact(llm):
    ps = prompts(16)
    together = llm.generate(ps, greedy(), use_tqdm=False)
    alone = [llm.generate([p], greedy(), use_tqdm=False)[0] for p in ps]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert all(len(o.outputs[0].token_ids) == 12 for o in together)


def test_greedy_follows_reference_argmax(llm, tiny_model):
    """Each greedy token is the argmax of a fresh full forward over the sequence so far."""
    model = load_model(tiny_model, torch.float32)
    p = prompts(1, seed=5)[0]
    out = llm.generate([p], greedy(max_tokens=6), use_tqdm=False)[0].outputs[0].token_ids
    seq = list(p)
    for token in out:
        assert token == int(full_logits(model, seq)[-1].argmax())
        seq.append(token)


def test_preemption_keeps_outputs_exact(tiny_model, llm):
    ps = [p[:8] for p in prompts(8, seed=2)]
    expected = [o.outputs[0].token_ids for o in llm.generate(ps, greedy(max_tokens=30), use_tqdm=False)]
    # 10 blocks of 4 tokens hold one full sequence (8 + 30 tokens), not eight.
    small = LLM(str(tiny_model), max_model_len=40, block_size=4, num_kv_blocks=10, skip_warmup=True)
    got = [o.outputs[0].token_ids for o in small.generate(ps, greedy(max_tokens=30), use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert small.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_ignores_batch_composition(llm):
    p = prompts(1, seed=7)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts(5, seed=8)
    mixed = llm.generate(others[:2] + [p] + others[2:],
                         [SamplingParams(temperature=0.7, max_tokens=10)] * 2 + [params]
                         + [SamplingParams(temperature=1.0, max_tokens=10)] * 3, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True)
    assert llm.generate([p], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_gives_n_distinct_outputs(llm):
    out = llm.generate([prompts(1)[0]], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8,
                                                        ignore_eos=True), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_top_k_one_is_greedy(llm):
    p = prompts(1, seed=3)[0]
    sampled = llm.generate([p], SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
    assert sampled == llm.generate([p], greedy(8), use_tqdm=False)[0].outputs[0].token_ids


def test_max_tokens_min_tokens_and_stop_token(llm):
    p = prompts(1, seed=4)[0]
    free = llm.generate([p], greedy(10), use_tqdm=False)[0].outputs[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    assert free.finish_reason == "length"
    # min_tokens masks the stop token until enough tokens exist.
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 2,
                                           stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2
    assert stop_at not in out.token_ids[:first + 2]


def test_stop_string_truncates_text(llm):
    free = llm.generate("Hello", greedy(10), use_tqdm=False)[0].outputs[0]
    stop = free.text[4:6]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == free.text[:free.text.index(stop)]
    assert out.stop_reason == stop
    kept = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, stop=stop,
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]


def test_logprobs_match_reference(llm, tiny_model):
    model = load_model(tiny_model, torch.float32)
    p = prompts(1, seed=11)[0]
    out = llm.generate([p], greedy(4, logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    ref = torch.log_softmax(full_logits(model, p + out.outputs[0].token_ids), dim=-1)
    for i, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(p) - 1 + i]
        assert entry[token].rank == 1
        top = row.topk(3)
        assert set(entry) == set(top.indices.tolist())
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t].item()) < 1e-4
    assert out.prompt_logprobs[0] is None
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(entry[p[i]].logprob - ref[i - 1, p[i]].item()) < 1e-4


def test_bad_requests_are_refused(llm):
    with pytest.raises(FP8LMError, match="max_model_len"):
        llm.generate([[5] * 200], greedy(4), use_tqdm=False)
    with pytest.raises(FP8LMError, match="max_tokens"):
        llm.generate([[5] * 100], greedy(40), use_tqdm=False)
    with pytest.raises(FP8LMError, match="vocabulary"):
        llm.generate([[100000]], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests()


def test_tensor_parallel_size_that_does_not_divide_is_refused(tiny_model):
    with pytest.raises(FP8LMError, match=r"tensor_parallel_size=3 does not divide num_attention_heads=4"):
        LLM(str(tiny_model), tensor_parallel_size=3)


def test_hung_step_times_out_and_engine_reports_dead(tiny_model, monkeypatch):
    import time

    from fp8lm.errors import EngineDeadError

    monkeypatch.setenv("FP8LM_ENGINE_ITERATION_TIMEOUT_S", "0.5")
    llm = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    monkeypatch.setattr(llm.engine.runner, "run", lambda *a, **k: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="ENGINE_ITERATION_TIMEOUT_S"):
        llm.generate([[5, 6, 7]], greedy(4), use_tqdm=False)
    assert time.monotonic() - start < 5
    with pytest.raises(EngineDeadError):
        llm.generate([[5, 6, 7]], greedy(4), use_tqdm=False)


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(3), use_tqdm=False)[0]
    assert out.prompt == "user: hi\nassistant: "
    assert out.prompt_token_ids == llm.get_tokenizer().encode("user: hi\nassistant: ", add_special_tokens=False)


def test_decode_steps_keep_tokens_in_sequence_order(llm, monkeypatch):
    """The invariant fused decode kernels rely on (AttentionMetadata's docstring)."""
    seen = []
    execute = llm.engine.runner.execute
    monkeypatch.setattr(llm.engine.runner, "execute", lambda ids, pos, meta: seen.append(meta) or execute(ids, pos, meta))
    llm.generate([[5, 6, 7], [8, 9], [10, 11, 12, 13]], greedy(4), use_tqdm=False)
    decode = [m for m in seen if m.max_query_len == 1]
    assert decode and all(m.batch_size > 1 for m in decode)
    for meta in decode:
        order = torch.arange(meta.batch_size)
        assert torch.equal(meta.query_index[:, 0], order) and torch.equal(meta.flat_index, order)


def test_bfloat16_loads_on_every_cpu(tiny_model):
    """oneDNN packs bfloat16 weights only on CPUs with AVX-512 BW/VL/DQ (or AVX-NE-CONVERT); elsewhere
    the plain weight serves, and bfloat16 still runs (it used to fail at load on AVX2 machines)."""
    from fp8lm.model.linear import OneDNNPacked, onednn_packs

    from fp8lm.fp8.cpu_kernels import cpu_kernels
    from fp8lm.quant.bfloat16_format import BF16Panels

    llm = LLM(str(tiny_model), dtype="bfloat16", max_model_len=64, skip_warmup=True)
    q = llm.engine.host.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.format, OneDNNPacked) == onednn_packs(torch.bfloat16)
    # Without bfloat16 arithmetic (AVX2 only) the kernels' bfloat16 panels compute (torch's own
    # bfloat16 matmul is ~5x slower than float32 there).
    assert isinstance(q.format, BF16Panels) == (not onednn_packs(torch.bfloat16) and cpu_kernels() is not None)
    ref = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    tokens = list(range(3, 30))
    assert (llm.engine.score(tokens).float() - ref.engine.score(tokens)).abs().max() < 0.1


def test_bfloat16_without_bfloat16_arithmetic_computes_in_float32_sums(tiny_model, monkeypatch):
    """On any CPU: the path for CPUs without bfloat16 arithmetic (dense Linears on the kernels'
    bfloat16 panels, attention matmuls on float32 copies rounded once) gives torch's bfloat16 results
    up to the float32 sums' order: one bfloat16 rounding step per matmul at most."""
    import fp8lm.engine.model_host as model_host
    from fp8lm.fp8.cpu_kernels import cpu_kernels
    from fp8lm.model.layers import Matmul
    from fp8lm.quant.bfloat16_format import BF16Panels

    if cpu_kernels() is None:
        pytest.skip("no CPU kernels here")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 40, generator=g).bfloat16(), torch.randn(3, 40, 7, generator=g).bfloat16()
    exact = a.double() @ b.double()
    for upcast in (False, True):
        matmul = Matmul()
        matmul.float32_sums = upcast
        got = matmul(a, b)
        assert got.dtype == torch.bfloat16 and ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
    monkeypatch.setattr(model_host, "bfloat16_matmul_is_slow", lambda: True)
    fallback = LLM(str(tiny_model), dtype="bfloat16", max_model_len=64, skip_warmup=True)
    model = fallback.engine.host.model
    assert all(isinstance(m.format, BF16Panels) for m in (model.model.layers[0].self_attn.q_proj, model.lm_head))
    assert model.model.layers[0].self_attn.attn.matmul_qk.float32_sums
    ref = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    tokens = list(range(3, 30))
    assert (fallback.engine.score(tokens).float() - ref.engine.score(tokens)).abs().max() < 0.1


def test_warmup_runs_every_bucket(tiny_model, caplog):
    """Warm-up steps one prompt per length bucket (capped by max_model_len) and decode batches of
    1, 2, 4 ... max_num_seqs, each timed in the log."""
    import logging

    with caplog.at_level(logging.INFO, logger="fp8lm.engine.llm_engine"):
        llm = LLM(str(tiny_model), max_model_len=200, max_num_seqs=6, skip_warmup=False)
    assert llm.engine.warmup_buckets() == [(1, 128), (1, 199), (1, 1), (2, 1), (4, 1), (6, 1)]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up in"))
    assert all(f"{kind} {b}x{t} " in line for b, t in llm.engine.warmup_buckets()
               for kind in ["prefill" if t > 1 else "decode"])
