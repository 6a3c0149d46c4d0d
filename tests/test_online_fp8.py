"""`--quantization fp8` (vLLM's online dynamic FP8): per-tensor FP8 weights computed at load, FP8
inputs per token at run time, no calibration; `--kv-cache-dtype fp8` with scale 1.0. Checked against
torch's own float8 casts on the checkpoint's tensors."""
import httpx
import pytest
import torch
from safetensors.torch import load_file

from fp8lm import LLM
from fp8lm.errors import FP8LMError
from fp8lm.quant.fp8_linear import is_fp8
from fp8lm.quant.fp8_modules import FP8KVCache
from server_util import running_server

E4M3 = torch.float8_e4m3fn


def online(model, **kw):
    return LLM(str(model), quantization="fp8", max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 20, **kw)


def test_every_linear_but_the_head_is_fp8_with_the_checkpoints_maximum_as_scale(tiny_model):
    llm = online(tiny_model)
    model = llm.engine.host.model
    tensors = load_file(tiny_model / "model.safetensors")
    linears = {n: m for n, m in model.named_modules() if is_fp8(m)}
    assert len(linears) == 2 * 7 and not is_fp8(model.lm_head)
    for name, m in linears.items():
        w = tensors[f"{name}.weight"]
        assert m.weight_scale == pytest.approx(float(w.abs().max()) / 448, rel=1e-7)
        assert m.input_scale is None                                      # per token, at run time
        expected = (w / m.weight_scale).clamp(-448, 448).to(E4M3)
        assert torch.equal(m.format.fp8_weight(m).view(torch.uint8), expected.view(torch.uint8))


def test_a_linear_computes_what_torchs_float8_casts_give(tiny_model):
    m = online(tiny_model).engine.host.model.model.layers[1].mlp.down_proj
    x = torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(3)) * 4
    x[2] *= 50                                                            # tokens of very different sizes
    s_x = x.abs().amax(dim=1, keepdim=True) / 448
    xq = (x / s_x).to(E4M3).double() * s_x.double()
    wq = m.format.fp8_weight(m).double() * m.weight_scale
    expected = xq @ wq.T
    assert torch.allclose(m(x).double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_fp8_kv_cache_has_unit_scales_and_four_times_the_blocks(tiny_model):
    plain = LLM(str(tiny_model), max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 18)
    for kv in ("fp8", "fp8_e4m3"):
        llm = LLM(str(tiny_model), quantization="fp8", kv_cache_dtype=kv, max_model_len=64, skip_warmup=True,
                  kv_cache_memory=1 << 18)
        attn = llm.engine.host.model.model.layers[0].self_attn.attn
        assert isinstance(attn.k_cache, FP8KVCache) and attn.k_cache.scale == 1.0
        assert llm.engine.num_kv_blocks == 4 * plain.engine.num_kv_blocks
    assert not isinstance(online(tiny_model).engine.host.model.model.layers[0].self_attn.attn.k_cache, FP8KVCache)


def test_what_cannot_be_honoured_is_refused(tiny_model, tmp_path):
    with pytest.raises(FP8LMError, match="kv_cache_dtype='fp8' needs quantization 'fp8' or 'inc'"):
        LLM(str(tiny_model), kv_cache_dtype="fp8", max_model_len=64, skip_warmup=True)
    with pytest.raises(FP8LMError, match="quantization='awq'"):
        LLM(str(tiny_model), quantization="awq", max_model_len=64, skip_warmup=True)
    from fp8lm.quant.block_fp8 import save_block_fp8

    folder = save_block_fp8(tiny_model, tmp_path / "block", (32, 32))
    with pytest.raises(FP8LMError, match="already quantized"):
        LLM(str(folder), quantization="fp8", max_model_len=64, skip_warmup=True)
    # A block-FP8 folder has no KV scales: an FP8 cache gets 1.0, as vLLM gives it.
    kv = LLM(str(folder), kv_cache_dtype="fp8", max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 20)
    assert kv.engine.host.model.model.layers[0].self_attn.attn.k_cache.scale == 1.0


def test_serve_quantization_fp8_answers(tiny_model):
    with running_server(str(tiny_model), "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--max-model-len", "64",
                        "--served-model-name", "tiny") as proc:
        r = httpx.post(f"{proc.base_url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "FP8 KV cache with scale 1.0" in proc.output()
