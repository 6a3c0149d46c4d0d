"""Block-FP8 folders (quant_method "fp8", weight_block_size): written by fp8lm, read by fp8lm, against
a reference built here from the folder's own tensors with torch's float8 casts in transformers."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from fp8lm import LLM, SamplingParams
from fp8lm.errors import FP8LMError, ModelLoadError
from fp8lm.quant.block_fp8 import BlockFP8Linear, quantize_blocks, save_block_fp8

BLOCK = (48, 48)          # the tiny model's 64 and 128 are 1.33 and 2.67 blocks: partial blocks on both axes
TOKENS = [1] + [int(t) for t in torch.randint(3, 90, (40,), generator=torch.Generator().manual_seed(5))]


def expand(scales: torch.Tensor, shape, block) -> torch.Tensor:
    return scales.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


def test_block_scales_map_each_blocks_maximum_onto_the_full_range():
    w = torch.randn(100, 70, generator=torch.Generator().manual_seed(0))
    w[99, 69] = 50.0                                           # the last, partial block's maximum
    q, s = quantize_blocks(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            block = w[i * 48:(i + 1) * 48, j * 48:(j + 1) * 48]
            assert float(s[i, j]) == pytest.approx(float(block.abs().max()) / 448, rel=1e-6)
    assert float(q[99, 69].float()) == 448.0
    expected = (w / expand(s, w.shape, BLOCK)).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    src = make_tiny_llama(tmp_path_factory.mktemp("src") / "llama")
    return src, save_block_fp8(src, tmp_path_factory.mktemp("out") / "block", BLOCK)


def test_the_folder_holds_fp8_blocks_and_the_config_vllm_reads(folders):
    _, folder = folders
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": list(BLOCK), "modules_to_not_convert": ["lm_head"]}
    tensors = load_file(folder / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)        # 64 x 128
    assert tensors["lm_head.weight"].dtype == torch.float32


def mean_kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(ref.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(other.double(), -1))).sum(-1).mean())


def reference_model(src, folder, block=BLOCK):
    """transformers' model with each Linear's weight dequantized from the folder's blocks and its input
    cast per token in groups of block_k with torch's float8 (independent of fp8lm's code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tensors = load_file(folder / "model.safetensors")
    bk = block[1]

    def quantize_input(module, args):
        x = args[0]
        groups = x.split(bk, dim=-1)
        scales = [g.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 448 for g in groups]
        return torch.cat([(g / s).to(torch.float8_e4m3fn).float() * s for g, s in zip(groups, scales)], dim=-1)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q, s = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"]
            module.weight.data = q.float() * expand(s, q.shape, block)
            module.register_forward_pre_hook(quantize_input)
    return model


def reference_logits(src, folder, tokens, block=BLOCK) -> torch.Tensor:
    with torch.no_grad():
        return reference_model(src, folder, block)(torch.tensor([tokens])).logits[0, :-1].float()


def load(folder, **kw):
    return LLM(str(folder), max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 20, **kw)


def test_block_fp8_folder_runs_as_the_reference_computes_it(folders, monkeypatch):
    """The reference path (no CPU kernels) against transformers with the folder's dequantized blocks
    and torch's float8 casts of each input group: the same FP8 values, only float32 summation order
    separates them (measured 1.4e-6 of logits up to 3.8). That order can put an input on the other
    side of an FP8 rounding boundary, which moves that position's logits ~1e-2 (measured on an AVX2
    EPYC, whose torch kernels sum in another order: 1.4e-2 at one of 40 positions, later ones 3.5e-5):
    all but a few positions to 1e-5, none by more than such a flip."""
    from fp8lm.fp8 import cpu_kernels as ck

    src, folder = folders
    monkeypatch.setattr(ck, "cpu_kernels", lambda: None)
    llm = load(folder)
    q = llm.engine.host.model.model.layers[0].self_attn.q_proj
    assert type(q.format) is BlockFP8Linear and q.weight.dtype == torch.float8_e4m3fn   # 1 byte at rest
    ours, ref = llm.engine.score(TOKENS), reference_logits(src, folder, TOKENS)
    plain = load(src).engine.score(TOKENS)
    rows = (ours - ref).abs().amax(-1)
    assert (rows < 1e-5 * ref.abs().max()).float().mean() >= 0.95 and rows.max() < 0.05, rows
    assert (plain - ref).abs().max() > 10 * rows.max()      # FP8 itself is visible


@pytest.mark.skipif(__import__("fp8lm.fp8.cpu_kernels", fromlist=["x"]).cpu_kernels() is None,
                    reason="the CPU kernels' block path")
def test_the_kernels_block_path_equals_the_reference_linear_by_linear(folders, monkeypatch):
    """Each Linear on the CPU kernels (one W8A8 call per block column, 1 byte per weight) against the
    reference format on the same inputs: the same FP8 casts of the same values, so float32 summation
    order is all that differs. End to end the two paths then part only where such a difference puts
    an activation on the other side of an FP8 rounding boundary: the same greedy tokens."""
    from fp8lm.fp8 import cpu_kernels as ck
    from fp8lm.quant.block_fp8 import BlockFP8Panels

    _, folder = folders
    fast = load(folder)
    kernels = ck.cpu_kernels
    monkeypatch.setattr(ck, "cpu_kernels", lambda: None)
    slow = load(folder)
    monkeypatch.setattr(ck, "cpu_kernels", kernels)
    fast_modules = dict(fast.engine.host.model.named_modules())
    g = torch.Generator().manual_seed(1)
    compared = 0
    for name, m in slow.engine.host.model.named_modules():
        if isinstance(getattr(m, "format", None), BlockFP8Linear):
            k = fast_modules[name]
            assert isinstance(k.format, BlockFP8Panels) and k.weight.is_meta
            x = torch.randn(7, m.in_features, generator=g) * torch.logspace(-2, 2, 7)[:, None]
            want, got = m(x), k(x)
            assert float((got - want).norm() / want.norm()) < 1e-6, name
            compared += 1
    assert compared == 2 * 7
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [TOKENS[:9], TOKENS[5:30]]
    assert [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in slow.generate(prompts, params, use_tqdm=False)]


def test_what_a_block_fp8_folder_cannot_be_is_refused(folders, tmp_path):
    src, folder = folders
    with pytest.raises(FP8LMError, match="already quantized"):
        save_block_fp8(folder, tmp_path / "again")
    with pytest.raises(FP8LMError, match="two positive sizes"):
        save_block_fp8(src, tmp_path / "zero", (0, 4))
    assert not (tmp_path / "zero").exists()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [128]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"weight_block_size \[128\]"):
        LLM(str(bad), max_model_len=64, skip_warmup=True)
    config["quantization_config"]["quant_method"] = "awq"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quant_method 'awq' is not supported; fp8lm reads compressed-tensors, fp8"):
        LLM(str(bad), max_model_len=64, skip_warmup=True)


def test_transformers_reads_a_block_fp8_folder_fp8lm_wrote(tmp_path):
    """transformers' own loader (which dequantizes block-FP8 on a CPU) reads the folder, and its
    weights are the folder's blocks times their scales (to bfloat16 rounding where it dequantizes
    through bfloat16: 2^-8 relative)."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_llama(tmp_path / "src", hidden_size=128, intermediate_size=256)
    folder = save_block_fp8(src, tmp_path / "block", (128, 128))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        q, s = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"]
        ours = q.float() * expand(s, q.shape, (128, 128))
        theirs = model.get_submodule(name).weight.float()
        assert ((theirs - ours).abs() <= 2.0 ** -8 * ours.abs()).all(), name


@pytest.mark.parametrize("block", [(32, 32), (48, 48)], ids=["aligned", "straddling"])
def test_tensor_parallel_shards_of_blocks(folders, tmp_path, block):
    """TP=2 shards rows and columns of every block grid. Where shards end on block boundaries (32 of
    64 / 128) each rank's input groups are the unsharded model's: TP=2 equals TP=1 to float32 order.
    Where a block straddles two ranks (48), a row-parallel rank scales its part of the group alone,
    as every engine must without a collective per group: close, not equal."""
    src, _ = folders
    folder = save_block_fp8(src, tmp_path / "block", block)
    one = load(folder)
    two = LLM(str(folder), max_model_len=64, skip_warmup=True, kv_cache_memory=1 << 20, tensor_parallel_size=2)
    try:
        a, b = one.engine.score(TOKENS), two.engine.score(TOKENS)
    finally:
        two.engine.shutdown()
    if block == (32, 32):
        assert (a - b).abs().max() < 1e-4 * a.abs().max()
    else:   # other group scales for some inputs: a part of the FP8 error, less than FP8's own
        plain = load(src).engine.score(TOKENS)
        assert 0 < mean_kl(a, b) < mean_kl(plain, a)


@pytest.mark.slow
def test_smollm2_block_fp8_is_the_reference_to_the_fp8_noise_floor(smollm2, tmp_path):
    """SmolLM2 written as block-FP8 (576 = 4.5 blocks of 128) and run on the CPU kernels, against
    transformers with the folder's dequantized blocks and torch's float8 casts per 1x128 input group,
    on held-out text: as far apart as fp8lm is from itself with its embeddings perturbed by 1e-6
    (tests/fp8_noise.py; measured ratio 0.94-1.04 per window). A real difference adds to that floor."""
    from fp8_noise import perturb_embeddings
    from fp8lm.eval.perplexity import read_text, token_windows

    folder = save_block_fp8(smollm2, tmp_path / "block", (128, 128))
    kw = dict(max_model_len=512, max_num_seqs=1, num_kv_blocks=40, skip_warmup=True)
    ours, perturbed = LLM(str(folder), **kw), LLM(str(folder), **kw)
    perturb_embeddings(perturbed, 1e-6)
    windows = token_windows(ours.get_tokenizer(), read_text(None), 256)[:4]
    paths = floor = 0.0
    for w in windows:
        mine = ours.engine.score(w)
        paths += mean_kl(reference_logits(smollm2, folder, w, (128, 128)), mine)
        floor += mean_kl(mine, perturbed.engine.score(w))
    assert floor > 0.005 * len(windows)                      # the floor exists
    assert paths < 1.25 * floor, (paths, floor)


def _blockwise_mm(xq, wq_t, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
    """F.scaled_mm's blockwise semantics, written out: xq [M, K] with decode scales [M, K/128] per
    1x128 group, wq_t [K, N] with [K/128, N/128] per 128x128 block; products summed in float32."""
    import torch.nn.functional as F

    assert (recipe_a, recipe_b) == (F.ScalingType.BlockWise1x128, F.ScalingType.BlockWise128x128)
    assert xq.shape[1] % 128 == 0 and wq_t.shape[1] % 128 == 0 and scale_a.stride(0) == 1   # outer-dim-major
    x = xq.float() * scale_a.repeat_interleave(128, 1)
    w = wq_t.float() * scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)
    return (x @ w).to(output_dtype)


def test_the_native_block_path_pads_to_whole_blocks_and_computes_the_reference(monkeypatch):
    """The CUDA path's padding, scale grid and slicing, on the CPU with F.scaled_mm's blockwise
    semantics written out (this machine has no GPU; benchmarks/gpu_check.py runs the real one):
    equal to the reference within bfloat16's rounding of the output."""
    import torch.nn.functional as F

    from fp8lm.model.linear import ParallelLinear
    from fp8lm.quant.block_fp8 import BlockFP8Native, make_block_fp8

    monkeypatch.setattr(F, "scaled_mm", _blockwise_mm)
    gen = torch.Generator().manual_seed(3)
    layer = ParallelLinear(576, 200, bias=False)                    # 4.5 blocks of inputs, 1.6 of outputs
    make_block_fp8(layer, (128, 128))
    w, scale = quantize_blocks(torch.randn(200, 576, generator=gen), (128, 128))
    layer.format.load(layer, "weight", w)
    layer.format.load(layer, "weight_scale_inv", scale)
    x = torch.randn(7, 576, generator=gen) * torch.linspace(0.1, 10, 576)
    expected = layer.format.apply(layer, x, None)
    dense = layer.format.dense_weight(layer)
    native = BlockFP8Native.from_layer(layer)
    assert torch.equal(native.dense_weight(layer), dense) and torch.equal(native.fp8_weight(layer).view(torch.uint8),
                                                                          w.view(torch.uint8))
    got = native.apply(layer, x, None)
    assert got.shape == expected.shape
    assert ((got - expected).abs() <= 2 ** -8 * expected.abs() + 1e-6).all()


def test_the_native_block_path_takes_only_shards_that_start_on_a_block_boundary():
    """Rank 1 of 2 starts at row 256 of 512 (a boundary) or 288 of 576 (inside a block)."""
    from fp8lm.model.linear import ColumnParallelLinear, RowParallelLinear
    from fp8lm.quant.block_fp8 import _whole_blocks, make_block_fp8

    for cls, out_f, in_f, aligned in ((ColumnParallelLinear, 512, 256, True), (ColumnParallelLinear, 576, 256, False),
                                      (RowParallelLinear, 256, 512, True), (RowParallelLinear, 256, 576, False)):
        layer = cls(in_f, out_f, False, tp_rank=1, tp_size=2, process_group=None)
        make_block_fp8(layer, (128, 128))
        layer.format.load(layer, "weight", quantize_blocks(torch.randn(out_f, in_f), (128, 128))[0])
        assert _whole_blocks(layer) == aligned, (cls.__name__, out_f, in_f)
