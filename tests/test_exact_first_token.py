"""exact_first_token: the first token's K/V kept beside the FP8 cache, its q·k and p·v terms exact."""
import pytest
import torch

from fp8lm.fp8 import cpu_kernels as ck
from fp8lm.fp8.numerics import fake_quant
from fp8lm.model.attention import AttentionMetadata, CacheAdjustment, PagedAttention, build_attn_bias
from fp8lm.quant.fp8_modules import FP8Format, FP8KVCache, FP8Matmul, FP8Softmax

E4M3 = torch.float8_e4m3fn
FMT = FP8Format(E4M3, 448.0)
HEADS, KV_HEADS, D, BLOCK = 4, 2, 16, 4
FIRST_BLOCK = 2     # the sequence's first block is block 2; its position 4 lands in block 0's first slot


def grid(x: torch.Tensor, scale: float) -> torch.Tensor:
    return fake_quant(x, 1 / scale, E4M3, 448.0) * scale


def fp8_attention(exact_first_token: bool, scales) -> PagedAttention:
    sq, sk, sv = scales
    attn = PagedAttention(HEADS, KV_HEADS, D)
    attn.matmul_qk, attn.matmul_av = FP8Matmul(FMT, sq, sk), FP8Matmul(FMT, 1 / 448, sv)
    attn.softmax, attn.k_cache, attn.v_cache = FP8Softmax(FMT, 1 / 448), FP8KVCache(FMT, sk), FP8KVCache(FMT, sv)
    attn.adjustment = CacheAdjustment(exact_first_token=exact_first_token)
    shape = (KV_HEADS, 3, BLOCK, D)
    first = torch.zeros(2, KV_HEADS, 4, D) if exact_first_token else None
    attn.bind_cache(torch.zeros(shape, dtype=E4M3), torch.zeros(shape, dtype=E4M3), first)
    return attn


def metadata(positions: list[int]) -> AttentionMetadata:
    table = torch.tensor([[FIRST_BLOCK, 0]])
    slots = torch.tensor([int(table[0, p // BLOCK]) * BLOCK + p % BLOCK for p in positions])
    n = len(positions)
    bias = build_attn_bias(torch.tensor([positions]), torch.tensor([positions[-1] + 1]), 2 * BLOCK, torch.float32)
    return AttentionMetadata(slots, table, 2 * BLOCK, torch.arange(n)[None], torch.arange(n), bias)


def reference(q, k, v, scales, exact_first_token: bool) -> torch.Tensor:
    """Each query p over keys 0..p: FP8 q·k, softmax cast onto its grid, FP8 p·v; with
    exact_first_token, key 0's score and its p·v term from the unrounded q, k and v."""
    sq, sk, sv = scales
    group, out = HEADS // KV_HEADS, torch.empty(q.shape[0], HEADS * D)
    for p in range(q.shape[0]):
        for h in range(HEADS):
            kv = h // group
            qs = q[p, h] * D ** -0.5
            keys, values = grid(k[:p + 1, kv], sk), grid(v[:p + 1, kv], sv)
            scores = grid(keys, sk) @ grid(qs, sq)
            if exact_first_token:
                scores[0] = qs @ k[0, kv]
            probs = grid(torch.softmax(scores, dim=0), 1 / 448)
            row = probs[1:] @ values[1:]
            row += probs[0] * (v[0, kv] if exact_first_token else values[0])
            out[p, h * D:(h + 1) * D] = row
    return out


def inputs():
    g = torch.Generator().manual_seed(0)
    n = 6
    q = torch.randn(n, HEADS, D, generator=g) * 3
    k = torch.randn(n, KV_HEADS, D, generator=g)
    k[0] *= 4       # a sink: a large first key
    v = torch.randn(n, KV_HEADS, D, generator=g)
    scales = (float((q * D ** -0.5).abs().max()) / 448, float(k.abs().max()) / 448, float(v.abs().max()) / 448)
    return q, k, v, scales


def test_first_token_terms_are_exact_in_prefill_and_decode():
    q, k, v, scales = inputs()
    for exact in (True, False):
        attn = fp8_attention(exact, scales)
        prefill = attn(q[:5], k[:5], v[:5], metadata(list(range(5))))
        decode = attn(q[5:], k[5:], v[5:], metadata([5]))
        expected = reference(q, k, v, scales, exact)
        assert torch.allclose(torch.cat([prefill, decode]), expected, atol=1e-5, rtol=1e-5), exact
        if exact:
            assert torch.equal(attn.first_kv[0, :, FIRST_BLOCK], k[0]) and torch.equal(attn.first_kv[1, :, 0], v[4])
            with_exact = expected
    assert (with_exact - reference(q, k, v, scales, False)).abs().max() > 1e-3     # the option changes the result


class CountingKernels:
    def __init__(self, kernels):
        self.kernels, self.calls = kernels, 0

    def paged_attention(self, *args, **kwargs):
        self.calls += 1
        return self.kernels.paged_attention(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernels, name)


def test_the_attention_kernel_keeps_the_first_token_exact():
    """The fused FP8 attention kernel (prompt chunk, then a decode step) against the same reference."""
    from fp8lm.quant.fused_ops import FusedFP8Attention

    kernels = ck.cpu_kernels()
    if kernels is None:
        pytest.skip("no CPU FP8 kernels on this machine")
    q, k, v, scales = inputs()
    expected = reference(q, k, v, scales, True)
    for isa in [i for i, code in ck.ISA_CODES.items() if code <= ck.ISA_CODES[kernels.isa]]:
        attn = fp8_attention(True, scales)
        assert FusedFP8Attention.can_fuse(attn)
        counting = CountingKernels(ck.CpuKernels(kernels.module, isa))
        attn.fused_attention = FusedFP8Attention(attn, counting)
        got = torch.cat([attn(q[:5], k[:5], v[:5], metadata(list(range(5)))), attn(q[5:], k[5:], v[5:], metadata([5]))])
        assert counting.calls == 2, isa
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (isa, (got - expected).abs().max())
