"""Perplexity, FP8 comparison, SQNR report and sensitivity on a tiny Llama."""
import math
import struct

import pytest
import torch

from conftest import measure_tiny
from fp8lm import LLM
from fp8lm.eval.perplexity import compare, perplexity
from fp8lm.eval.report import module_sqnr, sensitivity, write_sqnr_report

WINDOWS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))] for n in (40, 33)]


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    prefix = measure_tiny(tiny_model, tmp_path_factory.mktemp("eval") / "m", WINDOWS)
    ref = LLM(str(tiny_model), max_model_len=64, skip_warmup=True)
    fp8 = LLM(str(tiny_model), max_model_len=64, skip_warmup=True, quantization="inc", kv_cache_dtype="fp8_inc",
              quant_config={"mode": "QUANTIZE", "dump_stats_path": str(prefix)})
    return ref.engine, fp8.engine


def test_perplexity_matches_transformers(tiny_model, engines):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in WINDOWS:
            lp = torch.log_softmax(model(torch.tensor([w])).logits[0, :-1], -1)
            nll -= float(lp.gather(1, torch.tensor(w[1:])[:, None]).sum())
            n += len(w) - 1
    assert perplexity(engines[0], WINDOWS).value == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_comparison_with_itself_and_with_fp8(engines):
    ref, fp8 = engines
    same = compare(ref, ref, WINDOWS)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0 and same.ppl_change_pct == 0
    diff = compare(ref, fp8, WINDOWS)
    assert diff.mean_kl > 0 and 0.5 < diff.top1_agreement
    assert diff.reference.value == same.reference.value


def test_sqnr_report_files(engines, tmp_path):
    errors = module_sqnr(*engines, WINDOWS)
    names = {e.name for e in errors}
    assert "lm_head" in names and "model.layers.1.self_attn.attn.k_cache" in names
    assert all(5 < e.sqnr_db < 80 for e in errors)
    md, png = write_sqnr_report(errors, str(tmp_path / "r"))
    rows = open(md).read().splitlines()[2:]
    assert len(rows) == len(errors)
    values = [float(r.split("|")[2]) for r in rows]
    assert values == sorted(values)                          # worst first
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 520 and height > len(errors) * 6


def test_sensitivity_keeps_the_best_gain_per_byte(engines):
    ref, fp8 = engines
    before = perplexity(fp8, WINDOWS).value
    result = sensitivity(ref, fp8, WINDOWS, max_increase_pct=0.0, max_weight_share=0.5, max_attention_share=0.5)
    layers = {f"model.layers.{i}.{g}" for i in (0, 1) for g in ("self_attn", "mlp", "self_attn.attn")}
    assert set(result.unit_gain_kl) == layers | {"lm_head"}
    # q, o: 64x64; k, v: 32x64 (2 KV heads); MLP 3 x 128x64: 12,288 of 73,728 decoder weights
    assert result.unit_share["model.layers.0.self_attn"] == pytest.approx(1 / 6)
    assert result.unit_share["model.layers.0.self_attn.attn"] == pytest.approx(1 / 2)     # one of two layers
    assert result.kept_share <= 0.5 and result.kept_attention_share <= 0.5 and result.blocklist
    assert result.baseline_ppl == perplexity(ref, WINDOWS[1::2]).value      # checked on the odd windows
    assert result.with_blocklist_pct < result.all_fp8_pct
    # one scale for both kinds: a unit's gain per share of its own cap (both caps 0.5 here)
    per_price = [result.unit_gain_kl[u] / result.unit_share[u] for u in result.blocklist if u != "lm_head"]
    assert per_price == sorted(per_price, reverse=True)
    assert perplexity(fp8, WINDOWS).value == before            # the FP8 modules and caches are put back


class _FixedLogits:
    def __init__(self, logits):
        self.logits = logits

    def score(self, window):
        return self.logits[:len(window)]


def test_ppl_change_bound_from_the_per_token_differences():
    """Two tokens whose NLLs differ by 0.1 and 0.3 nats: mean 0.2, variance 0.01, standard error
    sqrt(0.01 / 2); the point change is e^0.2 - 1."""
    ref = torch.zeros(3, 4)                                   # uniform: NLL ln 4 for every token
    cand = torch.zeros(3, 4)
    for row, target, diff in ((0, 1, 0.1), (1, 2, 0.3)):
        # lowering the target's logit by x raises its NLL by x + ln((3 + e^-x) / 4)
        x = torch.tensor(diff)
        for _ in range(50):                                   # Newton on f(x) = x + ln((3 + e^-x)/4) - diff
            f = x + torch.log((3 + torch.exp(-x)) / 4) - diff
            x = x - f / (1 - torch.exp(-x) / (3 + torch.exp(-x)))
        cand[row, target] = -x
    result = compare(_FixedLogits(ref), _FixedLogits(cand), [[0, 1, 2]])
    assert result.nll_diff_sq == pytest.approx(0.1 ** 2 + 0.3 ** 2, rel=1e-5)
    assert result.ppl_change_pct == pytest.approx(100 * math.expm1(0.2), rel=1e-5)
    assert result.ppl_change_bound_pct(1.0) == pytest.approx(100 * math.expm1(0.2 + math.sqrt(0.01 / 2)), rel=1e-4)
    assert result.ppl_change_bound_pct(0.0) == pytest.approx(result.ppl_change_pct)


def test_sensitivity_ranks_on_other_windows_than_it_checks(engines):
    """Gains from the even windows, the perplexity it stops on from the odd ones: a unit that happened
    to help on the tokens that choose it is not also the evidence that the budget is met."""
    from fp8lm.eval.report import HighPrecisionSwapper, linear_units

    ref, fp8 = engines
    result = sensitivity(ref, fp8, WINDOWS, max_increase_pct=0.0, max_weight_share=0.5)
    assert result.all_fp8_pct == pytest.approx(compare(ref, fp8, WINDOWS[1::2]).ppl_change_pct, abs=1e-9)
    unit = "model.layers.1.mlp"
    swapper = HighPrecisionSwapper(fp8.host.model, ref.host.model, linear_units(fp8.host.model))
    everything = compare(ref, fp8, WINDOWS[0::2]).mean_kl
    try:
        swapper.keep({unit})
        kept = compare(ref, fp8, WINDOWS[0::2]).mean_kl
    finally:
        swapper.keep(set())
    assert result.unit_gain_kl[unit] == pytest.approx(everything - kept, abs=1e-9)


def test_a_kept_attention_unit_is_the_reference_attention_over_a_high_precision_cache(engines):
    """Layer 1's attention kept: its q·k, softmax, p·v and K/V cache are the reference's modules over
    a cache of the model dtype. With every other unit kept too, the quantized model is the reference."""
    from fp8lm.eval.report import HighPrecisionSwapper, attention_units, linear_units, unit_pattern

    ref, fp8 = engines
    units = {**linear_units(fp8.host.model), **attention_units(fp8.host.model)}
    assert units["model.layers.1.self_attn.attn"] == [f"model.layers.1.self_attn.attn.{n}" for n in (
        "matmul_qk", "softmax", "matmul_av", "k_cache", "v_cache")]
    assert unit_pattern("model.layers.1.self_attn.attn") == r"model\.layers\.1\.self_attn\.attn\."
    attn = fp8.host.model.get_submodule("model.layers.1.self_attn.attn")
    fp8_cache = attn.k_cache_tensor
    swapper = HighPrecisionSwapper(fp8.host.model, ref.host.model, units)
    try:
        swapper.keep({"model.layers.1.self_attn.attn"})
        assert attn.k_cache_tensor.dtype == torch.float32 and attn.k_cache is ref.host.model.get_submodule(
            "model.layers.1.self_attn.attn.k_cache")
        swapper.keep(set(units))
        assert torch.equal(fp8.score(WINDOWS[0]), ref.score(WINDOWS[0]))
    finally:
        swapper.keep(set())
    assert attn.k_cache_tensor is fp8_cache and attn.k_cache_tensor.dtype == torch.float8_e4m3fn


def test_sensitivity_caps_each_kind_of_unit(engines):
    ref, fp8 = engines
    result = sensitivity(ref, fp8, WINDOWS, max_increase_pct=0.0, max_weight_share=0.0, max_attention_share=0.5)
    assert result.kept_share == 0 and result.kept_attention_share == pytest.approx(0.5)
    assert set(result.blocklist) - {"lm_head"} <= {"model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"}
    assert not any(u.endswith(".attn") for u in sensitivity(ref, fp8, WINDOWS, 0.0, 0.5, 0.0).blocklist)


def test_sensitivity_budget_needs_the_bound_not_the_estimate(engines):
    """A budget equal to the all-FP8 point estimate is not met by it: its one-sided bound is higher."""
    ref, fp8 = engines
    everything = compare(ref, fp8, WINDOWS)
    result = sensitivity(ref, fp8, WINDOWS, max_increase_pct=everything.ppl_change_pct, max_weight_share=0.5)
    assert everything.ppl_change_bound_pct(1.645) > everything.ppl_change_pct
    assert result.blocklist and result.with_blocklist_bound_pct >= result.with_blocklist_pct


def test_every_window_starts_as_the_tokenizer_starts_a_document():
    """Gemma's tokenizer adds <bos>: each window gets it (a window without it is off the model's
    distribution), and the windows' texts still cover the text once, in order."""
    from fp8lm.eval.perplexity import token_windows

    class Chars:
        def __init__(self, prefix):
            self.prefix = prefix

        def encode(self, text, add_special_tokens=True):
            return (self.prefix if add_special_tokens else []) + [ord(c) for c in text]

    text = "abcdefghijklmnopqrstuvw"
    with_bos = token_windows(Chars([2]), text, 8)
    assert all(w[0] == 2 and len(w) <= 8 for w in with_bos) and len(with_bos) == 4
    assert [t for w in with_bos for t in w[1:]] == [ord(c) for c in text]
    assert token_windows(Chars([]), text, 8) == [[ord(c) for c in text[i:i + 8]] for i in range(0, 23, 8)]
