"""The Llama decoder in plain PyTorch, with the options its relatives need (model/families.py:
q/k/v and o bias, q/k norm, head_dim, sliding windows, Gemma 3's layout). Input is a flat list of tokens from many sequences
(`input_ids`, `positions`: [T]); `AttentionMetadata` says which sequence each belongs to."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp8lm.model.attention import AttentionMetadata, PagedAttention
from fp8lm.model.config import ModelConfig
from fp8lm.model.layers import OffsetRMSNorm, RMSNorm, VocabEmbedding
from fp8lm.model.linear import ColumnParallelLinear, LMHead, ParallelLinear, RowParallelLinear, project
from fp8lm.model.rope import RotaryEmbedding, apply_rotary


class TensorParallel:
    """This process's place in a tensor-parallel group (rank 0 of 1 without parallelism)."""

    def __init__(self, rank: int = 0, size: int = 1, group=None):
        self.rank, self.size, self.group = rank, size, group

    def linear_args(self) -> dict:
        return {"tp_rank": self.rank, "tp_size": self.size, "process_group": self.group}


def rms_norm(config: ModelConfig, size: int) -> RMSNorm:
    return (OffsetRMSNorm if config.norm_adds_one else RMSNorm)(size, config.rms_norm_eps)


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class LlamaAttention(nn.Module):
    fusable_projections = (("q_proj", "k_proj", "v_proj"),)    # same input: one matmul where quantized

    def __init__(self, config: ModelConfig, tp: TensorParallel, layer: int):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        if config.num_attention_heads % tp.size or config.num_key_value_heads % tp.size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} and num_key_value_heads="
                f"{config.num_key_value_heads} must both divide by tensor_parallel_size={tp.size}")
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = d
        bias = config.qkv_bias
        self.q_proj = ColumnParallelLinear(h, config.num_attention_heads * d, bias, **tp.linear_args())
        self.k_proj = ColumnParallelLinear(h, config.num_key_value_heads * d, bias, **tp.linear_args())
        self.v_proj = ColumnParallelLinear(h, config.num_key_value_heads * d, bias, **tp.linear_args())
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, h, config.o_bias, **tp.linear_args())
        # Qwen3, Gemma 3: RMSNorm over each head's q and k (one weight of head_dim, replicated on every rank).
        self.q_norm = rms_norm(config, d) if config.qk_norm else None
        self.k_norm = rms_norm(config, d) if config.qk_norm else None
        window = config.layer_windows[layer] if config.layer_windows else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, sliding_window=window,
                                   scale=config.attn_scale)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    fusable_projections = (("gate_proj", "up_proj"),)

    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        bias = config.mlp_bias
        self.gate_proj = ColumnParallelLinear(h, i, bias, **tp.linear_args())
        self.up_proj = ColumnParallelLinear(h, i, bias, **tp.linear_args())
        self.down_proj = RowParallelLinear(i, h, bias, **tp.linear_args())
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(ACTIVATIONS[self.activation](gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Llama: post_attention_layernorm is the MLP's input norm. Gemma 3 (`sandwich_norms`):
    it normalizes attention's output, and pre/post_feedforward_layernorm surround the MLP."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, layer: int):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = rms_norm(config, h)
        self.self_attn = LlamaAttention(config, tp, layer)
        self.post_attention_layernorm = rms_norm(config, h)
        self.mlp = LlamaMLP(config, tp)
        self.sandwich_norms = config.sandwich_norms
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = rms_norm(config, h)
            self.post_feedforward_layernorm = rms_norm(config, h)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), meta))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(rope, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecodeKernel:
    """What a quantizer may set as `LlamaModel.fused_decode`: whole decode steps of the decoder
    layers in one call, the same numbers as the layers'. Declared here, built in quant/."""

    def applies(self, x: torch.Tensor, meta) -> bool:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta) -> torch.Tensor:
        raise NotImplementedError


class LlamaModel(nn.Module):
    fused_decode: DecodeKernel | None = None

    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        # Gemma 3: windowed layers rotate with their own base.
        self.local_rotary = None
        if config.local_rope_theta is not None:
            self.local_rotary = RotaryEmbedding(config.head_dim, config.local_rope_theta)
        self.local_layers = [w is not None and self.local_rotary is not None for w in config.layer_windows] \
            or [False] * config.num_hidden_layers
        self.embed_scale = config.embed_scale
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, tp, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config, config.hidden_size)

    def build_rope_caches(self, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None:
                rotary.build_cache(max_positions, device, dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale is None:
            return x
        # As transformers: the scale rounded to the model's dtype first.
        return x * torch.tensor(self.embed_scale, dtype=torch.float32).to(x.dtype).item()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids)
        rope = self.rotary(positions)
        if self.fused_decode is not None and self.fused_decode.applies(x, meta):
            return self.norm(self.fused_decode(x, rope, meta))
        local = self.local_rotary(positions) if self.local_rotary is not None else None
        for layer, is_local in zip(self.layers, self.local_layers):
            x = layer(local if is_local else rope, x, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        self.tp = tp or TensorParallel()
        self.model = LlamaModel(config, self.tp)
        # Replicated on every rank: logits need no gather before sampling.
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def tie_weights(self) -> None:
        # Only a dense LM head shares the embedding's tensor; a quantized one keeps its own copy.
        if self.config.tie_word_embeddings and self.lm_head.weight.dtype == self.model.embed_tokens.weight.dtype:
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def projection_groups(self) -> list[list[tuple[str, ParallelLinear]]]:
        """(name, Linear) of each group of Linears that read one input (each module's
        `fusable_projections`: q/k/v, gate/up), layer by layer."""
        groups = []
        for i, layer in enumerate(self.model.layers):
            for owner, prefix in ((layer.self_attn, f"model.layers.{i}.self_attn"), (layer.mlp, f"model.layers.{i}.mlp")):
                groups += [[(f"{prefix}.{n}", getattr(owner, n)) for n in names] for names in owner.fusable_projections]
        return groups

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]; `compute_logits` turns selected rows into logits."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)
