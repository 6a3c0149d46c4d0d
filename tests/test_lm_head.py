"""fp8lm's `lm_head_bfloat16` option: a kept float32 LM head computes with its weight rounded to
bfloat16 values (on the CPU kernels' bfloat16 panels), activations and sums in float32; the tied
embedding keeps its float32 values."""
import pytest
import torch

from conftest import make_tiny_llama, measure_tiny
from fp8lm import LLM
from fp8lm.fp8 import cpu_kernels as ck
from fp8lm.model.linear import LMHead
from fp8lm.quant.bfloat16_format import BF16Panels, keep_bfloat16_values

PROMPTS = [[int(t) for t in torch.randint(3, 90, (n,), generator=torch.Generator().manual_seed(n))] for n in (7, 13)]


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "llama", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def measured(tied_model, tmp_path_factory):
    return measure_tiny(tied_model, tmp_path_factory.mktemp("measure") / "inc_output", PROMPTS)


def fp8_llm(model, prefix, **options):
    config = {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(prefix),
              "blocklist": {"names": ["^lm_head$"]}, "fp8lm": options}
    return LLM(str(model), quantization="inc", quant_config=config, max_model_len=64, skip_warmup=True,
               kv_cache_memory=1 << 20)


def test_kept_head_computes_with_bfloat16_values_and_leaves_the_embedding(tied_model, measured):
    plain = LLM(str(tied_model), max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 20).engine.host.model
    weight = plain.lm_head.dense_weight().clone()
    model = fp8_llm(tied_model, measured, lm_head_bfloat16=True).engine.host.model
    head = model.lm_head
    assert type(head) is LMHead
    if ck.cpu_kernels() is not None:
        assert isinstance(head.format, BF16Panels) and head.format.panels.dtype == torch.bfloat16
    hidden = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(1)) * 3
    rounded = weight.bfloat16().double()
    expected = hidden.double() @ rounded.T
    bound = (weight.shape[1] + 5) * 2.0**-24 * (hidden.double().abs() @ rounded.abs().T)
    assert ((model.compute_logits(hidden).double() - expected).abs() <= bound).all()
    assert (weight.bfloat16().float() != weight).any()          # the rounding is not a no-op here
    assert torch.equal(head.dense_weight(), weight.bfloat16().float())
    assert torch.equal(model.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def test_without_the_option_the_head_keeps_float32(tied_model, measured):
    plain = LLM(str(tied_model), max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 20).engine.host.model
    head = fp8_llm(tied_model, measured).engine.host.model.lm_head
    assert not head.format.bfloat16_values
    assert torch.equal(head.dense_weight(), plain.lm_head.dense_weight())


def test_without_kernels_the_rounded_values_stay_in_the_weight():
    head = LMHead(24, 40)
    head.weight.data.normal_(generator=torch.Generator().manual_seed(2))
    weight = head.weight.detach().clone()
    keep_bfloat16_values(head, None)
    assert head.format.bfloat16_values and head.weight.dtype == torch.float32
    assert torch.equal(head.weight, weight.bfloat16().float())
    x = torch.randn(3, 24)
    assert torch.equal(head(x), x @ weight.bfloat16().float().T)


@pytest.mark.skipif(ck.cpu_kernels() is None, reason="the bfloat16 panels are the CPU kernels'")
def test_a_bfloat16_models_kept_head_gives_unrounded_float32_logits(tied_model, measured):
    """bfloat16 weights and hidden states, float32 sums and logits: against float64, not rounded to
    bfloat16 (whose steps of 1/16-1/8 at this size would tie many logits)."""
    plain = LLM(str(tied_model), dtype="bfloat16", max_model_len=64, skip_warmup=True,
                kv_cache_memory=1 << 20).engine.host.model
    config = {"mode": "QUANTIZE", "scale_method": "maxabs_hw", "dump_stats_path": str(measured),
              "blocklist": {"names": ["^lm_head$"]}, "fp8lm": {"lm_head_bfloat16": True},
              "allow_measurement_mismatch": True}
    model = LLM(str(tied_model), dtype="bfloat16", quantization="inc", quant_config=config, max_model_len=64,
                skip_warmup=True, kv_cache_memory=1 << 20).engine.host.model
    weight = plain.lm_head.dense_weight().double()
    hidden = (torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    logits = model.compute_logits(hidden)
    expected = hidden.double() @ weight.T
    bound = (weight.shape[1] + 5) * 2.0**-24 * (hidden.double().abs() @ weight.abs().T)
    assert logits.dtype == torch.float32 and ((logits.double() - expected).abs() <= bound).all()
    assert (logits != logits.bfloat16().float()).float().mean() > 0.9      # not on bfloat16's grid
    # A plain bfloat16 head rounds its logits, unless it is on the panels too (CPUs without bfloat16
    # arithmetic: model_host's bfloat16_in_float32_sums).
    plain_logits = plain.compute_logits(hidden)
    on_grid = bool((plain_logits == plain_logits.bfloat16().float()).all())
    assert on_grid != isinstance(plain.lm_head.format, BF16Panels)
