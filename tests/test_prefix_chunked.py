"""Automatic prefix caching and chunked prefill: the same numbers as one whole prefill per prompt,
less work, and streams that keep flowing while a long prompt is prefilled."""
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.model import attention

GEN = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)


def prompt(n, seed):
    return torch.randint(3, 98, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, **kw):
    return LLM(str(model), max_model_len=256, block_size=8, skip_warmup=True, **kw)


def outputs(llm, prompts):
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs])
            for o in llm.generate(prompts, GEN, use_tqdm=False)]


def assert_same(a, b, tol=1e-5):
    for (ta, la), (tb, lb) in zip(a, b):
        assert ta == tb
        for ea, eb in zip(la, lb):
            assert all(abs(ea[t] - eb[t]) < tol for t in ea)


def test_prefix_cache_hits_give_the_same_logprobs(tiny_model):
    shared = prompt(90, 1)
    prompts = [shared + prompt(5, s) for s in (2, 3)] + [shared]
    plain = outputs(engine(tiny_model, enable_prefix_caching=False), prompts)
    cached = engine(tiny_model)
    first = outputs(cached, prompts[:1])
    cache = cached.engine.block_manager.cache
    assert cache.hits == 0
    rest = outputs(cached, prompts[1:])
    assert cache.hits == 2 * (90 // 8) * 8          # every full shared block, found by both later prompts
    assert_same(first + rest, plain)
    assert_same(outputs(cached, prompts[:1]), first)       # now from its own cached blocks
    assert cache.hits == 3 * 88


def test_cached_blocks_are_evicted_least_recently_used(tiny_model):
    """A pool that holds two prompts' blocks at a time: older cached prefixes are evicted, and
    every answer is still the uncached one."""
    prompts = [prompt(60, s) for s in range(6)]
    plain = outputs(engine(tiny_model, enable_prefix_caching=False, num_kv_blocks=32), prompts)
    small = engine(tiny_model, num_kv_blocks=32, max_num_seqs=1)
    got = [outputs(small, [p])[0] for p in prompts] + [outputs(small, [prompts[-1]])[0]]
    assert_same(got[:-1], plain)
    assert_same(got[-1:], plain[-1:])
    cache = small.engine.block_manager.cache
    assert len(cache.blocks) <= 32 and cache.hits >= 56      # the last prompt, asked twice, hit


def test_chunked_prefill_equals_whole_prefill_and_streams_keep_flowing(tiny_model):
    long, short = prompt(200, 7), [prompt(10, s) for s in (8, 9)]
    whole = outputs(engine(tiny_model, enable_chunked_prefill=False, enable_prefix_caching=False), short + [long])
    chunked = engine(tiny_model, max_num_batched_tokens=32, enable_prefix_caching=False)
    assert_same(outputs(chunked, short + [long]), whole)

    e = chunked.engine
    for i, p in enumerate(short):
        e.add_request(f"s{i}", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    e.step()                                          # both short prompts prefilled
    e.add_request("long", long, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    steps_with_short_tokens = 0
    while e.requests["long"].seqs[0].num_output_tokens == 0:
        advanced = {o.request_id for o in e.step()}
        steps_with_short_tokens += {"s0", "s1"} <= advanced
    # 200 prompt tokens in a 32-token budget shared with two decodes: ~7 steps, each a token per stream
    assert steps_with_short_tokens >= 6


def test_query_blocks_give_the_unblocked_numbers(tiny_model, monkeypatch):
    """Prefill attention in blocks of QUERY_BLOCK queries equals attending all queries at once."""
    p = prompt(150, 11)
    full = engine(tiny_model, enable_prefix_caching=False).engine.score(p)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 16)
    blocked = engine(tiny_model, enable_prefix_caching=False).engine.score(p)
    assert (full - blocked).abs().max() < 1e-5


@pytest.fixture(scope="module")
def fp8_tiny(tiny_model, tmp_path_factory):
    """The tiny model calibrated with fp8lm's recipe: FP8 Linears, q·k, softmax, p·v and KV cache."""
    from fp8lm.entrypoints.calibrate import calibrate

    cal = calibrate(str(tiny_model), "builtin", tmp_path_factory.mktemp("cal"), num_samples=8, max_seq_len=64,
                    max_tokens=4, use_tqdm=False)
    return dict(quantization="inc", quant_config=str(cal.quant_config), kv_cache_dtype="fp8_inc")


def test_fp8_query_blocks_and_prefix_cache_are_exact(tiny_model, fp8_tiny, monkeypatch):
    """With FP8 attention and an FP8 KV cache: query blocks give the same scores bit for bit (each
    row's FP8 casts are the same arithmetic), and cached FP8 blocks give the uncached answers."""
    p = prompt(150, 12)
    full = engine(tiny_model, enable_prefix_caching=False, **fp8_tiny).engine.score(p)
    with monkeypatch.context() as m:
        m.setattr(attention, "QUERY_BLOCK", 16)
        assert (engine(tiny_model, enable_prefix_caching=False, **fp8_tiny).engine.score(p) - full).abs().max() < 1e-5
    prompts = [p[:100] + prompt(5, s) for s in (13, 14)]
    plain = outputs(engine(tiny_model, enable_prefix_caching=False, **fp8_tiny), prompts)
    cached = engine(tiny_model, **fp8_tiny)
    got = [outputs(cached, [q])[0] for q in prompts]
    assert cached.engine.block_manager.cache.hits == 96
    assert_same(got, plain)


def test_prompt_logprobs_gathered_across_chunks(tiny_model):
    p = prompt(100, 15)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)

    def prompt_lps(llm):
        return [None if e is None else {t: x.logprob for t, x in e.items()}
                for e in llm.generate([p], params, use_tqdm=False)[0].prompt_logprobs]

    whole = prompt_lps(engine(tiny_model, enable_chunked_prefill=False))
    chunked = prompt_lps(engine(tiny_model, max_num_batched_tokens=16))
    assert len(chunked) == len(whole) == 100 and chunked[0] is None
    assert all(abs(a[t] - b[t]) < 1e-5 for a, b in zip(whole[1:], chunked[1:]) for t in a)
