"""Convert a llama.cpp GGUF file (architectures llama, qwen2, qwen3, phi3, gemma3) into an HF-style folder.

Weights are dequantized to float32. For `llama` q/k are un-permuted (llama.cpp's converter
interleaves the rotary halves of each head; HF keeps them split); the others are stored
unpermuted (llama.cpp runs them with NeoX-style rotary). Phi-3's fused attn_qkv and ffn_up (gate
and up) stay fused, under HF's names, as in a Phi-3 checkpoint. Gemma 3's norms are stored as
1 + weight (llama.cpp adds the one at conversion); its settings the GGUF does not carry are llama.cpp's
(every 6th layer global, windowed layers rotating with base 10,000). The folder is built next to its destination and
renamed into place, so an interrupted conversion never leaves a half folder behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fp8lm.errors import ModelLoadError
from fp8lm.files import check_private, make_dirs
from fp8lm.model.gguf_tokenizer import GEMMA_CHAT_TEMPLATE, save_sentencepiece_bpe

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
}
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# llama.cpp architecture -> (HF architecture, model_type)
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                  "qwen3": ("Qwen3ForCausalLM", "qwen3"), "phi3": ("Phi3ForCausalLM", "phi3"),
                  "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path: Path) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; fp8lm runs "
                             f"{', '.join(_ARCHITECTURES)}")
    architecture, model_type = _ARCHITECTURES[arch]
    a = arch + "."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    names = {t.name for t in reader.tensors}
    head_dim = _field(reader, a + "attention.key_length") or _field(reader, a + "rope.dimension_count", hidden // heads)
    cfg = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "vocab_size": int(_field(reader, a + "vocab_size", 0)) or len(_field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "gguf_source": {"file": path.name, "name": _field(reader, "general.name")},
    }
    window = _field(reader, a + "attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
    factor = _field(reader, a + "rope.scaling.factor")
    if _field(reader, a + "rope.scaling.type") == "linear" and factor:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    if arch == "gemma3":
        _gemma3_config(reader, cfg)
    return cfg


def _gemma3_config(reader, cfg: dict) -> None:
    """Gemma 3's settings in HF's form, with llama.cpp's values where the GGUF is silent."""
    layers, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):        # one flag per layer: windowed or not
        windowed = [bool(p) for p in pattern]
    else:
        windowed = [(i + 1) % int(pattern or 6) != 0 for i in range(layers)]
    cfg["layer_types"] = ["sliding_attention" if w and window else "full_attention" for w in windowed]
    cfg["rope_parameters"] = {
        "full_attention": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta"), **cfg.pop("rope_scaling", {})},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    # llama.cpp scales scores by head_dim ** -0.5, except for the 62-layer 27B (hidden / heads).
    per_head = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["query_pre_attn_scalar"] = per_head if layers == 62 else cfg["head_dim"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    if "<end_of_turn>" in tokens:         # chat turns end there (Gemma's generation_config)
        cfg["eos_token_id"] = [cfg["eos_token_id"], tokens.index("<end_of_turn>")]


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp stores each head's rows as (pairs, 2); HF as (2, pairs).
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader, cfg: dict, path: Path) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    permuted = cfg["model_type"] == "llama"
    gemma = cfg["model_type"] == "gemma3_text"
    layer_names = {"phi3": {**_LAYER_NAMES, "ffn_up": "mlp.gate_up_proj"},
                   "gemma3_text": _GEMMA_LAYER_NAMES}.get(cfg["model_type"], _LAYER_NAMES)
    out = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and parts[2] in layer_names:
            name = f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{suffix}"
        elif base in _GLOBAL_NAMES:
            name = f"{_GLOBAL_NAMES[base]}.{suffix}"
        else:
            continue  # e.g. rope_freqs: derived from the config
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {t.name} ({type(e).__name__}: {e})") from None
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if gemma and name.endswith("norm.weight"):
            w = w - 1.0
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = torch.tensor(w)  # a copy: GGUF memory maps are read-only
    return out


def save_gguf_tokenizer(reader, cfg: dict, path: Path, dest: Path) -> None:
    if cfg["model_type"] == "gemma3_text":
        save_sentencepiece_bpe(reader, _field, dest, GEMMA_CHAT_TEMPLATE)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(dest))
    # Keep the chat template inside tokenizer_config.json too, where most loaders look for it.
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if tok.chat_template and "chat_template" not in cfg:
        cfg["chat_template"] = tok.chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def convert_gguf(path: Path, dest: Path) -> Path:
    """Writes dest/{config.json, model.safetensors, tokenizer files}; returns dest. Idempotent."""
    path, dest = Path(path), Path(dest)
    if (dest / "config.json").is_file():
        check_private(dest, "the converted model folder")
        return dest
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    reader = open_gguf(path)
    cfg = gguf_config(reader, path)
    make_dirs(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        save_file(gguf_tensors(reader, cfg, path), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_gguf_tokenizer(reader, cfg, path, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        # config.json last: its presence marks a complete folder.
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():  # not a concurrent converter that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
