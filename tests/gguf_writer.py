"""Writes a tiny transformers model as llama.cpp's converter lays it out for its architecture
(tensor names, q/k permutation for `llama` only, metadata keys), with the char tokenizer of
conftest.write_char_tokenizer as a GGUF vocabulary. Written independently of fp8lm's reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import CHAT_TEMPLATE

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# Gemma 3: llama.cpp's names for its four norms per layer (ffn_norm is the MLP's input norm).
_GEMMA_NAMES = {**_NAMES, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
        "gemma3_text": "gemma3"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf: each head's rows go from (2, half) to (half, 2).
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocabulary(arch: str):
    """Tokens, types and BPE merges. Byte-level BPE (qwen) needs merges (two: a one-element array
    reads back as a string): '}' and '~' give way to 'Ġt' and 'he'."""
    control = ["<unk>", "<s>", "</s>"]
    space = "Ġ" if arch in ("qwen2", "qwen3") else "▁"      # byte-level BPE vs SentencePiece
    chars = [space if c == 32 else chr(c) for c in range(32, 127)]
    merges = []
    if arch in ("qwen2", "qwen3"):
        chars[-2:], merges = ["Ġt", "he"], ["Ġ t", "h e"]
    return control + chars, [3, 3, 3] + [1] * len(chars), merges


def write_gguf(folder: Path, path: Path) -> Path:
    import gguf
    import json

    cfg = json.loads((folder / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)          # Gemma 3: the global layers' base
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("phi3", "gemma3") and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    tokens, types, merges = _vocabulary(arch)
    w.add_tokenizer_model("gpt2" if arch in ("qwen2", "qwen3") else "llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:
        w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in load_file(str(folder / "model.safetensors")).items():
        module, _, suffix = name.rpartition(".")
        if module in _GLOBAL:
            gname = f"{_GLOBAL[module]}.{suffix}"
        else:
            layer, local = module.split(".", 3)[2], module.split(".", 3)[3]
            gname = f"blk.{layer}.{(_GEMMA_NAMES if arch == 'gemma3' else _NAMES)[local]}.{suffix}"
        a = t.to(torch.float32).numpy()
        if arch == "gemma3" and module.endswith("norm"):
            a = a + 1.0                     # llama.cpp stores Gemma's norms as 1 + weight
        if arch == "llama" and module.endswith("q_proj") and suffix == "weight":
            a = _permute(a, heads)
        elif arch == "llama" and module.endswith("k_proj") and suffix == "weight":
            a = _permute(a, kv)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
