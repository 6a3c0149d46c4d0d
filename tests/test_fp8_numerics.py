"""FP8 casts against an independent reference written from the format's definition."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8lm.fp8.formats import GAUDI2, GAUDI3
from fp8lm.fp8.numerics import fake_quant, round_to_fp8_grid, to_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
LAYOUT = {E4M3: (3, -6, 448.0), E5M2: (2, -14, 57344.0)}


def reference_round(v: float, dtype, limit: float) -> float:
    """Round-to-nearest-even onto the FP8 grid, saturating at ±limit, in plain Python floats."""
    mantissa, min_exp, _ = LAYOUT[dtype]
    if math.isnan(v):
        return v
    v = max(-limit, min(limit, v))
    if v == 0:
        return 0.0
    exp = max(math.floor(math.log2(abs(v))), min_exp)
    spacing = 2.0 ** (exp - mantissa)
    q = v / spacing
    r = math.floor(q)
    frac = q - r
    if frac > 0.5 or (frac == 0.5 and r % 2 == 1):
        r += 1
    return max(-limit, min(limit, r * spacing))


floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=400, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64), st.sampled_from([E4M3, E5M2]))
def test_grid_rounding_matches_reference_and_torch_cast(values, dtype):
    limit = LAYOUT[dtype][2]
    x = torch.tensor(values, dtype=torch.float32)
    ours = round_to_fp8_grid(x, dtype, limit)
    expected = torch.tensor([reference_round(v, dtype, limit) for v in x.tolist()])
    assert torch.equal(ours, expected)
    assert torch.equal(to_fp8(x, 1.0, dtype, limit).float(), expected)


def test_ties_round_to_even_and_subnormals():
    # E4M3 around 1: spacing 1/8. 1 + 1/16 is a tie between 1 (even mantissa) and 1.125.
    x = torch.tensor([1 + 1 / 16, 1 + 3 / 16, 2 ** -9, 2 ** -10, 3 * 2 ** -10, -(2 ** -10)])
    assert round_to_fp8_grid(x, E4M3, 448).tolist() == [1.0, 1.25, 2 ** -9, 0.0, 2 ** -8, -0.0]


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_saturation_nan_and_inf(dtype):
    limit = LAYOUT[dtype][2]
    x = torch.tensor([limit * 2, -limit * 10, float("inf"), float("-inf"), float("nan")])
    out = round_to_fp8_grid(x, dtype, limit)
    assert out[:4].tolist() == [limit, -limit, limit, -limit]
    assert math.isnan(out[4])
    assert torch.equal(to_fp8(x[:4], 1.0, dtype, limit).float(), out[:4])


def test_gaudi2_profile_saturates_at_240():
    x = torch.tensor([239.0, 250.0, 1000.0, -300.0])
    assert round_to_fp8_grid(x, E4M3, GAUDI2.e4m3_max).tolist() == [240.0, 240.0, 240.0, -240.0]
    assert GAUDI3.fullscale(E4M3) == 448.0 and GAUDI2.fullscale(E4M3) == 240.0


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=1, max_size=32), st.sampled_from([2.0 ** -6, 2.0 ** -2, 1.0, 16.0, 0.3]))
def test_quantize_dequantize_is_idempotent(values, scale):
    x = torch.tensor(values)
    once = fake_quant(x, 1 / scale, E4M3, 448.0) * scale
    twice = fake_quant(once, 1 / scale, E4M3, 448.0) * scale
    assert torch.equal(once, twice)


def test_all_fp8_values_are_fixed_points():
    every = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    finite = every[torch.isfinite(every)]
    assert torch.equal(round_to_fp8_grid(finite, E4M3, 448.0), finite)
