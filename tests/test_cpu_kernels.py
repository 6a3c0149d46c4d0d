"""The compiled CPU FP8 kernels against float64 references built from torch's own float8 casts."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fp8lm.errors import FP8LMError
from fp8lm.fp8 import cpu_kernels as ck

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
NAN_OR_INF = {E4M3: {0x7F, 0xFF}, E5M2: set(range(0x7C, 0x80)) | set(range(0xFC, 0x100))}


@pytest.fixture(scope="module")
def kernels() -> ck.CpuKernels:
    k = ck.cpu_kernels()
    if k is None:
        pytest.fail("the CPU FP8 kernels did not build on this x86-64 machine (see the log)")
    return k


def isas(kernels):
    return [isa for isa, code in ck.ISA_CODES.items() if code <= ck.ISA_CODES[kernels.isa]]


def weight_bytes(draw, n: int, k: int, dtype) -> torch.Tensor:
    """Random FP8 bytes, with subnormals, zeros and ±max over-represented; no NaN/inf encodings."""
    finite = [b for b in range(256) if b not in NAN_OR_INF[dtype]]
    special = [0x00, 0x80, 0x01, 0x81, 0x07, 0x87, 0x03] + ([0x7E, 0xFE] if dtype == E4M3 else [0x7B, 0xFB])
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(finite + special * 8, dtype=torch.uint8)
    return pool[torch.randint(len(pool), (n, k), generator=g)]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([E4M3, E5M2]))
    # Past 8 rows the blocked path: 9..20 leave every tail of its 6-row (AVX2) and 12-row (AVX-512) tiles.
    m = draw(st.sampled_from([1, 2, 3, 5, 8, *range(9, 21), 24, 37]))
    k = draw(st.integers(1, 200))
    n = draw(st.integers(1, 80))
    w = weight_bytes(draw, n, k, dtype)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(m, k, generator=g) * draw(st.sampled_from([1e-4, 1.0, 50.0]))
    per_channel = draw(st.booleans())
    w_scale = (torch.rand(n, generator=g) + 0.01) if per_channel else torch.tensor([0.37])
    static = draw(st.sampled_from(["static", "per-token", "none"]))
    x_scale = {"static": torch.tensor([0.013]), "per-token": torch.rand(m, generator=g) * 0.1 + 1e-3,
               "none": torch.tensor([1.0])}[static]
    bias = torch.randn(n, generator=g) if draw(st.booleans()) else None
    limit = draw(st.sampled_from([240.0, 448.0])) if dtype == E4M3 else 57344.0
    return dtype, x, w, w_scale, x_scale, static != "none", bias, limit


def reference(dtype, x, w, w_scale, x_scale, quantize, bias, limit):
    """float64 result of the same dequantized arithmetic, and a bound on float32 rounding."""
    if quantize:
        inv = 1.0 / x_scale
        xq = (x * inv[:, None]).clamp(-limit, limit).to(dtype).double()      # torch's own float8 cast
    else:
        xq = x.double()
    wq = w.view(dtype).double()
    terms = (xq @ wq.T) * w_scale.double()[None, :] * x_scale.double()[:, None]
    abs_terms = (xq.abs() @ wq.abs().T) * w_scale.double()[None, :] * x_scale.double()[:, None]
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    bound = (x.shape[1] + 5) * 2.0**-24 * (abs_terms + b.abs()) + 1e-44
    return terms + b, bound


@settings(max_examples=400, deadline=None)
@given(case=cases())
def test_linear_equals_float64_reference_to_float32_rounding(kernels, case):
    dtype, x, w, w_scale, x_scale, quantize, bias, limit = case
    n = w.shape[0]
    expected, bound = reference(*case)
    inv = (1.0 / x_scale) if quantize else None
    packed = ck.pack_panels(w.view(dtype))
    for isa in isas(kernels):
        k = ck.CpuKernels(kernels.module, isa)
        y = k.linear(x, packed, n, dtype, ck.kernel_col_scale(w_scale, n, dtype), x_scale, inv, limit, bias)
        err = (y.double() - expected).abs()
        assert (err <= bound).all(), f"{isa}: max error / bound = {(err / bound).max():.3g}"


@pytest.mark.parametrize("t, k", [(1, 5), (37, 64), (300, 200), (64, 600)])
def test_fp8_gram_is_the_fp8_inputs_second_moment(kernels, t, k):
    """XqᵀXq (the statistics pass's GPTQ second moments) from the W8A8 GEMM with xᵀ as both operands:
    the float64 product of the same FP8 values to float32 summation order, on every ISA."""
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)) * 3
    x[:, 0] = 0                                   # an input never seen
    scale = float(x.abs().amax()) / 448
    xq = (x * (1 / torch.tensor([scale]))).clamp(-448, 448).to(E4M3).double() * scale
    expected = xq.T @ xq
    bound = (t + 5) * 2.0**-24 * (xq.abs().T @ xq.abs()) + 1e-44
    for isa in isas(kernels):
        got = ck.CpuKernels(kernels.module, isa).fp8_gram(x, scale, E4M3, 448.0)
        err = (got.double() - expected).abs()
        assert got.shape == (k, k) and (err <= bound).all(), f"{isa}: max error / bound = {(err / bound).max():.3g}"


@settings(max_examples=150, deadline=None)
@given(m=st.sampled_from([1, 2, 7, 8, *range(9, 21), 24]), k=st.integers(1, 200), n=st.integers(1, 80),
       seed=st.integers(0, 2**31 - 1), with_bias=st.booleans())
def test_bfloat16_weights_equal_float64_reference_to_float32_rounding(kernels, m, k, n, seed, with_bias):
    """The kept LM head's path (fp8lm option lm_head_bfloat16): bfloat16 weight values, float32 sums."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 3).bfloat16()
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    expected = x.double() @ w.double().T + b
    bound = (k + 5) * 2.0**-24 * (x.double().abs() @ w.double().abs().T + b.abs()) + 1e-44
    packed = ck.pack_panels(w)
    assert packed.dtype == torch.bfloat16
    for isa in isas(kernels):
        y = ck.CpuKernels(kernels.module, isa).linear_bf16(x, packed, n, bias)
        err = (y.double() - expected).abs()
        assert (err <= bound).all(), f"{isa}: max error / bound = {(err / bound).max():.3g}"


def test_activation_cast_rounds_ties_to_even_and_saturates(kernels):
    # x * inv lands exactly between two E4M3 values, on subnormals, on ±max and beyond it.
    values = torch.tensor([1.0625, 1.1875, -1.0625, 2**-9 * 1.5, 2**-9 * 0.5, 2**-10, 448.0, 464.0, 1e6, -1e6, 0.0,
                           2**-7 * 1.0625, 240.0, 247.9])
    x = values[None, :]
    w = torch.eye(values.numel()).to(E4M3)                 # y[j] = xq[j]
    packed = ck.pack_panels(w)
    for limit in (448.0, 240.0):
        expected = x.clamp(-limit, limit).to(E4M3).float()
        for isa in isas(kernels):
            k = ck.CpuKernels(kernels.module, isa)
            y = k.linear(x, packed, values.numel(), E4M3, ck.kernel_col_scale(1.0, values.numel(), E4M3),
                         torch.tensor([1.0]), torch.tensor([1.0]), limit)
            assert torch.equal(y, expected), (isa, limit, y, expected)


def test_bfloat16_activations_give_bfloat16_results(kernels):
    w = (torch.randn(40, 33) * 20).to(E4M3)
    x = torch.randn(3, 33).bfloat16()
    y = kernels.linear(x, ck.pack_panels(w), 40, E4M3, ck.kernel_col_scale(0.5, 40, E4M3), torch.tensor([1.0]),
                       None, 448.0)
    expected = (x.double() @ (w.double() * 0.5).T).bfloat16()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_pack_unpack_round_trip_is_exact():
    for n, k in [(1, 1), (31, 7), (32, 5), (33, 64), (100, 3)]:
        w = torch.randint(0, 256, (n, k), dtype=torch.uint8).view(E4M3)
        packed = ck.pack_panels(w)
        assert packed.shape == (-(-n // 32), k, 32) and packed.dtype == torch.uint8
        assert torch.equal(ck.unpack_panels(packed, n, E4M3).view(torch.uint8), w.view(torch.uint8))


def test_bad_arguments_are_refused_with_the_problem_named(kernels):
    packed = ck.pack_panels(torch.zeros(8, 16).to(E4M3))
    col = ck.kernel_col_scale(1.0, 8, E4M3)
    with pytest.raises(RuntimeError, match="K=12"):
        kernels.linear(torch.zeros(2, 12), packed, 8, E4M3, col, torch.tensor([1.0]), None, 448.0)
    with pytest.raises(RuntimeError, match="row_scale"):
        kernels.linear(torch.zeros(2, 16), packed, 8, E4M3, col, torch.ones(3), None, 448.0)
    with pytest.raises(FP8LMError, match="unsupported weight dtype"):
        kernels.linear(torch.zeros(2, 16), packed, 8, torch.float16, col, torch.tensor([1.0]), None, 448.0)


def test_read_all_sums_every_byte(kernels):
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    expected = int(data.view(torch.int64).sum())                     # the probe adds 64-bit lanes
    for isa in isas(kernels):
        assert ck.CpuKernels(kernels.module, isa).read_all(data) == expected


@pytest.fixture
def fresh_dispatch():
    ck.cpu_kernels.cache_clear()
    yield
    ck.cpu_kernels.cache_clear()


def test_off_selects_the_reference_path_with_one_log_line(monkeypatch, caplog, fresh_dispatch):
    monkeypatch.setenv("FP8LM_CPU_KERNELS", "off")
    with caplog.at_level(logging.INFO, logger="fp8lm.fp8.cpu_kernels"):
        assert ck.cpu_kernels() is None
    assert [r.getMessage() for r in caplog.records] == ["CPU FP8 matmul: PyTorch reference path (FP8LM_CPU_KERNELS=off)"]


def test_a_failed_build_falls_back_and_says_why(monkeypatch, caplog, fresh_dispatch):
    def no_compiler(cache):
        raise OSError("g++: command not found\nmore detail")
    monkeypatch.setattr(ck, "_build", no_compiler)
    with caplog.at_level(logging.INFO, logger="fp8lm.fp8.cpu_kernels"):
        assert ck.cpu_kernels() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "g++: command not found" in messages[0] and "reference path" in messages[0]


def test_unknown_setting_is_refused(monkeypatch, fresh_dispatch):
    monkeypatch.setenv("FP8LM_CPU_KERNELS", "sse9")
    with pytest.raises(FP8LMError, match="FP8LM_CPU_KERNELS='sse9': allowed values are auto, off, avx2, avx512, avx512bf16"):
        ck.cpu_kernels()


def test_dequantize_equals_torch_casts_for_every_byte(kernels):
    data = torch.arange(256, dtype=torch.uint8).repeat(5)[:1001]      # a length that leaves a tail
    for dtype in (E4M3, E5M2):
        keep = torch.tensor([int(b) not in NAN_OR_INF[dtype] for b in data])
        fp8 = data[keep].view(dtype)
        for isa in isas(kernels):
            y = ck.CpuKernels(kernels.module, isa).dequantize(fp8, 0.3)
            assert torch.equal(y, fp8.float() * 0.3), (isa, dtype)


def test_fake_quant_equals_numerics_bit_for_bit(kernels):
    from fp8lm.fp8.numerics import fake_quant

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2996, generator=g) * 10.0 ** torch.randint(-6, 4, (2996,), generator=g),
                   torch.tensor([448.0, -448.0, 464.0, 1e9, -1e9, 0.0, -0.0, 2.0**-10, 1.0625, 57344.0, 61440.0])])
    for dtype, limit in ((E4M3, 448.0), (E4M3, 240.0), (E5M2, 57344.0)):
        for inv in (1.0, 0.37, 3.0):
            expected = fake_quant(x.view(31, 97), inv, dtype, limit)
            for isa in isas(kernels):
                got = ck.CpuKernels(kernels.module, isa).fake_quant(x.view(31, 97), inv, dtype, limit)
                assert torch.equal(got, expected), (isa, dtype, limit, inv)


def test_without_a_compiler_the_reference_path_is_chosen(tmp_path):
    """A real failed build (no C++ compiler) in a fresh cache: the notice, one warning, no crash."""
    import os
    import subprocess
    import sys

    code = ("import logging, torch\n"
            "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
            "from fp8lm.fp8.cpu_kernels import cpu_kernels\n"
            "assert cpu_kernels() is None\n"
            "print('REFERENCE PATH OK')\n")
    env = {**os.environ, "CXX": "/bin/false", "FP8LM_CACHE": str(tmp_path), "FP8LM_CPU_KERNELS": "auto"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("fp8lm.fp8.cpu_kernels")]
    assert len(lines) == 2 and "compiling" in lines[0], out.stderr            # the notice, then the outcome
    assert "could not be built" in lines[1] and "reference path" in lines[1]
    assert "REFERENCE PATH OK" in out.stdout


def test_write_cache_equals_torch_float8_casts_at_the_slots(kernels):
    g = torch.Generator().manual_seed(1)
    for dtype, limit, d in ((E4M3, 448.0, 64), (E4M3, 240.0, 20), (E5M2, 57344.0, 24)):
        x = torch.randn(5, 3, d, generator=g) * 10.0 ** torch.randint(-4, 3, (5, 3, d), generator=g)
        x[0, 0, :4] = torch.tensor([1e9, -1e9, 0.0, -0.0])
        slots = torch.tensor([7, 0, 12, 3, 15])
        inv = 0.7
        expected = torch.zeros(3, 4, 4, d, dtype=torch.uint8)
        flat = expected.view(3, 16, d)
        flat[:, slots] = (x * inv).clamp(-limit, limit).to(dtype).view(torch.uint8).transpose(0, 1)
        for isa in isas(kernels):
            cache = torch.full((3, 4, 4, d), 0x55, dtype=torch.uint8).view(dtype)
            ck.CpuKernels(kernels.module, isa).write_cache(x, cache, slots, inv, limit)
            written = cache.view(torch.uint8).view(3, 16, d)
            assert torch.equal(written[:, slots], flat[:, slots]), (isa, dtype)
            untouched = [s for s in range(16) if s not in slots.tolist()]
            assert (written[:, untouched] == 0x55).all()
    with pytest.raises(RuntimeError, match="slot 99 outside"):
        kernels.write_cache(torch.zeros(1, 3, 64), torch.zeros(3, 4, 4, 64).to(E4M3), torch.tensor([99]), 1.0, 448.0)
