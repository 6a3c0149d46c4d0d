"""The oneDNN GEMM (fp8/onednn_gemm.py) against oneDNN's own reorder (the widened layout) and against
the CPU kernels' FP8 GEMM (the results), in every element type oneDNN has on this CPU."""
from __future__ import annotations

import pytest
import torch

from fp8lm.errors import FP8LMError
from fp8lm.fp8 import cpu_kernels as ck
from fp8lm.fp8 import onednn_gemm as og
from fp8lm.fp8.numerics import fake_quant

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
U = 2.0 ** -24                      # float32's unit roundoff


@pytest.fixture(scope="module")
def module():
    return og.onednn_module()


@pytest.fixture(scope="module")
def kernels():
    k = ck.cpu_kernels()
    if k is None:
        pytest.fail("the CPU FP8 kernels did not build on this x86-64 machine")
    return k


def fp8_weight(n: int, k: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = torch.arange(256, dtype=torch.uint8)[values.isfinite()]
    return finite[torch.randint(len(finite), (n, k), generator=g)].view(dtype)


# oneDNN's layouts of a (K, N) weight: what its matmul picks on this CPU, and the AVX-512 BF16 / AMX
# kernels' blocked ones (VNNI pairs along K), spelled by hand so that they are checked on any CPU.
TAGS = (None, "BA16a64b2a", "BA16a32b2a", "AB16b64a2b", "BA8b", "ab")


@pytest.mark.parametrize("element", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("k, n", [(40, 100), (576, 192), (7, 33), (64, 32)])
def test_widened_panels_are_the_weight_in_onednns_layout(module, element, tag, k, n):
    """widen() writes each FP8 value through the table to the offset oneDNN's reorder gives it;
    oneDNN's reorder back to [N, K] must return the weight (padding zero)."""
    if tag is None and not module.probe(element.itemsize):
        pytest.skip(f"oneDNN has no {element} matmul on this CPU to choose a layout")
    plan = (module.GemmPlan(k, n, element.itemsize, og.LAYOUT_ROWS) if tag is None
            else module.GemmPlan(k, n, element.itemsize, tag))
    for dtype in (E4M3, E5M2):
        w8 = fp8_weight(n, k, dtype, seed=k * n)
        widened = torch.zeros(plan.packed_bytes(), dtype=torch.uint8)
        plan.widen(ck.pack_panels(w8), og.fp8_value_table(dtype, element), widened, dtype == E5M2)
        want = (w8.float() / ck.byte_value_factor(dtype)).to(element)     # the kernels' dequantized bytes
        assert torch.equal(plan.unpack(widened, torch.empty(0, dtype=element)), want), dtype
    padding = plan.pack(torch.ones(n, k, dtype=element)).view(element) == 0
    assert (widened.view(element)[padding] == 0).all()


def available_elements():
    return [pytest.param(e, id=str(e).replace("torch.", "")) for e in (torch.float32, torch.bfloat16)]


def gemm_or_skip(kernels, module, element):
    if not module.probe(element.itemsize):
        pytest.skip(f"oneDNN {module.version()} has no {element} matmul on this CPU")
    return og.OneDnnFP8Gemm(kernels, module, element)


@pytest.mark.parametrize("element", available_elements())
@pytest.mark.parametrize("m, k, n", [(64, 576, 192), (130, 200, 100), (300, 64, 37)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("scales", ["static", "per-token"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_onednn_gemm_equals_the_kernels_up_to_summation_order(kernels, module, element, m, k, n, dtype, scales,
                                                              x_dtype):
    """Both multiply the same FP8 values exactly and sum in float32, in other orders: each sum is
    within K * u * sum|products| of the exact one (Higham's gamma_K), so the two are within twice that,
    plus the epilogue's two roundings and x's dtype's rounding of the output."""
    gemm = gemm_or_skip(kernels, module, element)
    g = torch.Generator().manual_seed(m + k + n)
    w8 = fp8_weight(n, k, dtype, seed=n)
    x = (torch.randn(m, k, generator=g) * 3).to(x_dtype)
    limit = 448.0 if dtype == E4M3 else 57344.0
    w_scale = torch.rand(n, generator=g) + 0.01
    x_scale = torch.tensor([0.011]) if scales == "static" else torch.rand(m, generator=g) * 0.02 + 1e-3
    bias = torch.randn(n, generator=g)
    args = (ck.pack_panels(w8), n, dtype, ck.kernel_col_scale(w_scale, n, dtype), x_scale, 1 / x_scale, limit, bias)
    got, want = gemm.linear(x, *args), kernels.linear(x, *args)
    assert got.dtype == want.dtype == x_dtype
    xq = fake_quant(x.float(), (1 / x_scale).reshape(-1, 1), dtype, limit).double()
    magnitude = (xq.abs() @ w8.double().abs().t()) * w_scale.double() * x_scale.double().reshape(-1, 1)
    bound = 2 * k * U * magnitude + 4 * U * (magnitude + bias.double().abs())
    if x_dtype == torch.bfloat16:
        bound = bound + 2.0 ** -7 * want.double().abs()      # one bfloat16 step, where the sums straddle a rounding
    assert ((got.double() - want.double()).abs() <= bound).all()


@pytest.mark.parametrize("element", available_elements())
def test_fewer_rows_than_min_rows_stay_on_the_kernels(kernels, module, element):
    gemm = gemm_or_skip(kernels, module, element)
    w8 = fp8_weight(48, 64, E4M3, seed=1)
    x = torch.randn(gemm.min_rows - 1, 64)
    args = (ck.pack_panels(w8), 48, E4M3, ck.kernel_col_scale(torch.tensor([0.5]), 48, E4M3), torch.tensor([0.02]),
            torch.tensor([50.0]), 448.0)
    assert torch.equal(gemm.linear(x, *args), kernels.linear(x, *args))


def test_fp8lm_cpu_gemm_names_its_choices(monkeypatch, kernels):
    monkeypatch.setenv("FP8LM_CPU_GEMM", "amx")
    with pytest.raises(FP8LMError, match="FP8LM_CPU_GEMM='amx': allowed values are kernels, onednn"):
        og.fp8_gemm_for(kernels)
    monkeypatch.setenv("FP8LM_CPU_GEMM", "kernels")
    assert og.fp8_gemm_for(kernels) is kernels


def test_onednn_without_its_wheel_says_what_to_install(monkeypatch):
    monkeypatch.setattr(og, "onednn_library_dir", lambda: None)
    og.onednn_module.cache_clear()
    try:
        with pytest.raises(FP8LMError, match="pip install onednn-cpu-gomp"):
            og.onednn_module()
    finally:
        og.onednn_module.cache_clear()


def test_an_element_type_onednn_lacks_is_refused(kernels, module):
    missing = [e for e in (torch.bfloat16, torch.float32) if not module.probe(e.itemsize)]
    if not missing:
        pytest.skip("oneDNN has every element type on this CPU")
    with pytest.raises(FP8LMError, match="has no torch.bfloat16 matmul on this CPU"):
        og.OneDnnFP8Gemm(kernels, module, missing[0])


def test_row_counts_oneDNN_would_run_by_reference_go_to_the_kernels(kernels, module, caplog):
    """A weight layout no fast oneDNN kernel takes (here one given by hand; in use, the chosen layout
    at a row count far from the one it was chosen for) would run oneDNN's slow reference matmul: the
    kernels compute instead, with one warning per plan."""
    gemm = og.OneDnnFP8Gemm(kernels, module, torch.float32)
    k, n = 64, 48
    plan = module.GemmPlan(k, n, 4, "BA16a64b2a")
    gemm._plans[k, n] = plan, torch.zeros(plan.packed_bytes(), dtype=torch.uint8)
    assert plan.impl_for(100).startswith("ref")
    w8 = fp8_weight(n, k, E4M3, seed=3)
    args = (ck.pack_panels(w8), n, E4M3, ck.kernel_col_scale(torch.tensor([0.5]), n, E4M3), torch.tensor([0.02]),
            torch.tensor([50.0]), 448.0)
    with caplog.at_level("WARNING", logger="fp8lm.fp8.onednn_gemm"):
        for rows in (100, 120):
            x = torch.randn(rows, k)
            assert torch.equal(gemm.linear(x, *args), kernels.linear(x, *args))
    assert len(caplog.records) == 1 and "ref" in caplog.records[0].getMessage()
