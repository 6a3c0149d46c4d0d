"""The CPU kernels' attention over a float32 / bfloat16 paged cache (PlainKernelAttention): what
unquantized models, and layers a quantized model keeps in high precision, run on the CPU."""
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.fp8.cpu_kernels import ISA_CODES, CpuKernels, cpu_kernels
from fp8lm.quant import fused_ops
from test_quantize import chunked_prompt_logits

U = 2.0 ** -24      # float32's unit roundoff


@pytest.fixture(scope="module")
def best():
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no CPU kernels on this machine")
    return kernels


def kernels_for_isa(best, isa) -> CpuKernels:
    if ISA_CODES[isa] > ISA_CODES[best.isa]:
        pytest.skip(f"this CPU has no {isa}")
    return CpuKernels(best.module, isa)


def paged_case(dtype, seed, queries: int, heads=(6, 2), d=64):
    """Random caches, block tables with blocks in shuffled order, per-sequence context lengths; q
    [B, heads, d] (decode) or [B, L, heads, d] with causal bias rows ending at each context's end.
    heads: query heads, KV heads."""
    g = torch.Generator().manual_seed(seed)
    (heads, kvh), block, blocks, b, width = heads, 16, 40, 3, 7
    k_cache = (torch.randn(kvh, blocks, block, d, generator=g) * 2).to(dtype)
    v_cache = torch.randn(kvh, blocks, block, d, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in range(b)])
    ctx = torch.tensor([width * block, 17, 60])
    keys = torch.arange(width * block)
    # [B, L] query positions; a chunk longer than its context pads with position 0, as the runner does
    pos = (ctx[:, None] - queries + torch.arange(queries)[None]).clamp(min=0)
    allowed = (keys[None, None] <= pos[:, :, None]) & (keys[None, None] < ctx[:, None, None])
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    shape = (b, heads, d) if queries == 1 else (b, queries, heads, d)
    q = torch.randn(shape, generator=g)
    return q, k_cache, v_cache, tables, bias.reshape(b, -1) if queries == 1 else bias


def float64_attention(q, k_cache, v_cache, tables, bias, scale):
    """softmax(q·kᵀ·scale + bias)·v in float64 over the gathered keys, and the worst-case float32
    error bound of each output row: the scores' error (d products, the scaling) moves the output by at
    most twice the score error times max|v|; exp, the normalization and the p·v sum over n keys add
    (n + 8) roundings of max|v|."""
    kvh, b, s = k_cache.shape[0], tables.shape[0], bias.shape[-1]
    q4 = q if q.dim() == 4 else q[:, None]
    heads, d = q4.shape[2], q4.shape[3]
    keys = k_cache.double()[:, tables.flatten()].reshape(kvh, b, s, d)
    values = v_cache.double()[:, tables.flatten()].reshape(kvh, b, s, d)
    out = torch.empty(q4.shape, dtype=torch.float64)
    bound = torch.empty(q4.shape[:3], dtype=torch.float64)
    bias4 = bias.double().reshape(b, q4.shape[1], s)
    for i in range(b):
        for h in range(heads):
            kv = h // (heads // kvh)
            qs = q4[i, :, h].double() * scale
            scores = qs @ keys[kv, i].T + bias4[i]
            out[i, :, h] = torch.softmax(scores, -1) @ values[kv, i]
            score_error = (d + 2) * U * (qs.abs() @ keys[kv, i].abs().T).amax(-1)
            vmax = values[kv, i].abs().amax()
            bound[i, :, h] = vmax * (2 * score_error + (s + 8) * U)
    return out.reshape(q.shape), bound.reshape(q.shape[:-1])


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 5, 40])
@pytest.mark.parametrize("heads, d", [((6, 2), 64), ((4, 1), 256)])
def test_plain_attention_equals_float64_softmax_to_float32_rounding(best, isa, dtype, queries, heads, d):
    """Decode steps (one query) and prompt chunks (40 crosses the 32-query tiles), GQA, masked keys and
    padded blocks, caches in shuffled block order; heads of 64 and of 256 (Gemma 3's: p·v in passes
    of 16 vectors)."""
    kernels = kernels_for_isa(best, isa)
    q, k_cache, v_cache, tables, bias = paged_case(dtype, seed=queries, queries=queries, heads=heads, d=d)
    scale = d ** -0.5
    out = kernels.plain_attention(q, k_cache, v_cache, tables, bias.contiguous(), scale)
    ref, bound = float64_attention(q, k_cache, v_cache, tables, bias, scale)
    err = (out.double() - ref).abs().amax(-1)
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0 or dtype == torch.bfloat16        # float32 arithmetic, not a float64 copy


def test_plain_attention_refuses_fp8_caches_and_mismatched_shapes(best):
    q, k_cache, v_cache, tables, bias = paged_case(torch.float32, seed=0, queries=1)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        best.plain_attention(q, k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn), tables, bias, 0.1)
    with pytest.raises(RuntimeError, match="one shape and type"):
        best.plain_attention(q, k_cache, v_cache.to(torch.bfloat16), tables, bias, 0.1)
    with pytest.raises(RuntimeError, match="bias"):
        best.plain_attention(q, k_cache, v_cache, tables, bias[:, :-1].contiguous(), 0.1)


def plain_llm(tiny_model, dtype: str) -> LLM:
    return LLM(str(tiny_model), dtype=dtype, max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 18)


PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (50, 37, 9, 33)]


def kernel_and_module_logits(llm: LLM, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's logits of PROMPTS prefilled in chunks of 13 (later chunks over earlier ones'
    cached keys), through the kernel and then through the layers' plain modules."""
    layers = llm.engine.host.model.attention_layers()
    assert all(isinstance(a.fused_attention, fused_ops.PlainKernelAttention) for a in layers)
    calls = []
    original = fused_ops.PlainKernelAttention.attend
    monkeypatch.setattr(fused_ops.PlainKernelAttention, "attend", lambda self, *a: calls.append(1) or original(self, *a))
    fused = torch.cat(chunked_prompt_logits(llm, PROMPTS, 13)).float()
    ran = len(calls)
    assert ran >= len(layers) * 4                          # 50 tokens in chunks of 13: 4 steps
    for attn in layers:
        attn.fused_attention = None
    modules = torch.cat(chunked_prompt_logits(llm, PROMPTS, 13)).float()
    assert len(calls) == ran                               # the second pass ran the modules only
    return fused, modules


def test_float32_models_attend_through_the_kernel_as_their_modules_do(tiny_model, best, monkeypatch):
    """The same float32 sums in another order: logits within 1e-5."""
    fused, modules = kernel_and_module_logits(plain_llm(tiny_model, "float32"), monkeypatch)
    diff = (fused - modules).abs().max().item()
    assert 0 < diff <= 1e-5, diff


def test_bfloat16_models_attend_through_the_kernel_closer_than_bfloat16_itself(tiny_model, best, monkeypatch):
    """The bfloat16 modules round scores and probabilities to bfloat16 (2^-9 relative each); the
    kernel keeps them in float32. So the two paths differ by those roundings only: less, on average,
    than the bfloat16 model differs from the float32 one (which adds the weights' and every other
    activation's rounding)."""
    fused, modules = kernel_and_module_logits(plain_llm(tiny_model, "bfloat16"), monkeypatch)
    float32 = torch.cat(chunked_prompt_logits(plain_llm(tiny_model, "float32"), PROMPTS, 13)).float()
    paths = (fused - modules).abs().mean().item()
    assert 0 < paths < (modules - float32).abs().mean().item()


def test_a_hooked_module_sends_the_layer_back_to_its_modules(tiny_model, best):
    """MEASURE's observers hook the attention's matmuls: the kernel must not run past them."""
    llm = plain_llm(tiny_model, "float32")
    attn = llm.engine.host.model.attention_layers()[0]
    seen = []
    attn.matmul_qk.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(seen) == 3                                  # the prompt step and two decode steps


def test_decode_through_the_kernel_equals_the_modules(tiny_model, best):
    """Greedy decode of a float32 model, kernel vs modules: same tokens, logprobs within 1e-4."""
    from test_quantize import PROMPTS, assert_same_generations

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    llm = plain_llm(tiny_model, "float32")
    a = llm.generate(PROMPTS, params, use_tqdm=False)
    for attn in llm.engine.host.model.attention_layers():
        attn.fused_attention = None
    b = llm.generate(PROMPTS, params, use_tqdm=False)
    assert_same_generations(a, b)
