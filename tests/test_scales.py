"""Every scale method on known inputs, against values worked out by hand from the formulas:
scale = maxabs / (fullscale * backoff), backoff 0.5 (weights) / 0.25 (activations), then rounded."""
import pytest
import torch

from fp8lm.fp8.formats import CPU, GAUDI2, GAUDI3
from fp8lm.fp8.scale_methods import NAMED_METHODS
from fp8lm.fp8.scales import activation_scale, weight_scale

E4M3 = torch.float8_e4m3fn


def act(method, maxabs, profile):
    return activation_scale(maxabs, NAMED_METHODS[method].activation, profile, E4M3)


def wscale(method, profile, maxabs=None, weight=None):
    return weight_scale(weight, None if maxabs is None else torch.tensor(maxabs), NAMED_METHODS[method].weight,
                        profile, E4M3)


def test_research_note_worked_example_gaudi2():
    # qkv input maxabs 4.406 -> 4.406 / 60 = 0.0734 -> pow2 0.125 = 2^-3 -> G2 set {16, 1, 1/16, 1/256}: 1.0
    assert act("maxabs_hw", 4.406, GAUDI2) == 1.0


@pytest.mark.parametrize("maxabs,profile,expected", [
    (4.406, GAUDI3, 2 ** -4),       # 4.406 / 112 = 0.0393 -> 2^-4.67 -> 2^-4
    (4.406, CPU, 2 ** -4),          # CPU: hw-aligned = pow2, fullscale 448
    (100.0, GAUDI2, 16.0),          # 100 / 60 = 1.67 -> 2 -> 16^(ceil(1/4)) = 16
    (1000.0, GAUDI2, 16.0),         # 16.7 -> 32 -> clamped to the set's top, 16
    (1e-6, GAUDI2, 1 / 256),        # tiny -> clamped to the set's bottom, 2^-8
    (1e-30, GAUDI3, 2.0 ** -55),    # clamped to 2^-55
    (500.0, GAUDI3, 8.0),           # 500 / 112 = 4.46 -> 8 (inside 2^-55..2^7)
])
def test_maxabs_hw(maxabs, profile, expected):
    assert act("maxabs_hw", maxabs, profile) == expected


def test_maxabs_pow2_arbitrary_unit_and_single_scale():
    assert act("maxabs_pow2", 3.0, CPU) == 2 ** -5            # 3 / 112 = 0.0268 -> 2^-5.2 -> 2^-5
    assert act("maxabs_arbitrary", 3.0, CPU) == pytest.approx(3.0 / 112)
    assert act("maxabs_arbitrary", 3.0, GAUDI2) == pytest.approx(3.0 / 60)
    assert act("unit_scale", 3.0, GAUDI2) == 1.0
    assert act("hw_aligned_single_scale", 3.0, GAUDI2) == 16.0
    assert act("hw_aligned_single_scale", 3.0, GAUDI3) == 128.0


def test_weight_scales_per_tensor():
    assert wscale("maxabs_pow2", CPU, [[0.37096911668777466]]).item() == 2 ** -9    # 0.371/224 = 0.00166 -> 2^-9
    assert wscale("maxabs_hw", GAUDI2, [[0.5]]).item() == 1 / 16   # 0.5/120 -> 2^-7 -> up to the set: 2^-4
    assert wscale("maxabs_arbitrary", GAUDI3, [[0.5]]).item() == pytest.approx(0.5 / 224)
    assert wscale("unit_scale", CPU, [[0.5]]).item() == 1.0


def test_weight_scales_per_channel():
    w = torch.tensor([[0.5, -1.0], [3.0, 0.1], [-0.01, 0.02]])
    # row maxabs 1.0, 3.0, 0.02 -> /224 -> 0.00446, 0.0134, 8.9e-5 -> pow2 2^-7, 2^-6, 2^-13
    expected = torch.tensor([[2.0 ** -7], [2.0 ** -6], [2.0 ** -13]])
    assert torch.equal(wscale("act_maxabs_hw_weights_pcs_maxabs_pow2", CPU, weight=w), expected)
    assert torch.equal(wscale("act_maxabs_pow2_weights_pcs_maxabs_pow2", CPU, maxabs=[[1.0], [3.0], [0.02]]), expected)


def test_opt_weight_picks_least_squared_error_scale():
    # W = 300 * [1, 1/16]: with E4M3 (max 448) a scale >= 1 keeps 300 in range; scale 1 represents
    # 300 as 288 (spacing 32) while scale 1/2... saturates at 224. Enumerate by hand over the G2 set:
    w = torch.tensor([[300.0, 18.75]])
    errors = {}
    for s in (16.0, 1.0, 1 / 16, 1 / 256):
        q = torch.tensor([min(v / s, 240.0) for v in (300.0, 18.75)])
        grid = torch.round(q / torch.exp2(torch.floor(torch.log2(q)) - 3)) * torch.exp2(torch.floor(torch.log2(q)) - 3)
        errors[s] = float(((grid.clamp(max=240) * s - w) ** 2).sum())
    best = min(errors, key=errors.get)
    assert wscale("maxabs_hw_opt_weight", GAUDI2, weight=w).item() == best
    pcs = wscale("act_maxabs_hw_weights_pcs_opt_pow2", CPU, weight=torch.randn(5, 7))
    assert pcs.shape == (5, 1) and torch.all(torch.log2(pcs) == torch.round(torch.log2(pcs)))


def test_named_methods_backoffs():
    for name, spec in NAMED_METHODS.items():
        if spec.weight.value_type == "MAXABS" or spec.weight.value_type == "OPT":
            assert spec.weight.backoff == 0.5, name
        if not spec.activation.dynamic and spec.activation.value_type == "MAXABS":
            assert spec.activation.backoff == 0.25, name
