"""Llama-family decoder (Llama 2/3.x, SmolLM, Mistral, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm) in pure torch.

One class covers them all because they differ only in flags of ModelConfig. Q/K/V and gate/up projections are
fused into single matmuls (the loader concatenates the checkpoint's weights) to halve the op count per layer,
which dominates at small batch on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttentionMetadata, paged_attention
from .rope import RotaryEmbedding, apply_rotary

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (K, V), each [num_slots, num_kv_heads, head_dim]


def o_proj_has_bias(cfg: ModelConfig) -> bool:
    """attention_bias biases o_proj too in Llama and Qwen3; Qwen2's bias is on q/k/v only."""
    return cfg.attention_bias and cfg.architecture != "qwen2"


class Linear(nn.Linear):
    """nn.Linear without random init: weights always come from a checkpoint, and initializing on the meta device
    (where the loader builds the model) would import torch._dynamo, seconds of start-up."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without random init, for the same reason as Linear."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=o_proj_has_bias(cfg))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionMetadata,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        t, h, qk_size = x.shape[0], self.num_heads, self.q_size + self.kv_size
        qkv = self.qkv_proj(self.input_norm(x))
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:  # q and k heads are adjacent: rotate them in one pass
            qk = apply_rotary(qkv[:, :qk_size].view(t, h + self.num_kv_heads, self.head_dim), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(t, h, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size : qk_size].view(t, self.num_kv_heads, self.head_dim))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        x = x + self.o_proj(paged_attention(q, k, v, kv[0], kv[1], attn, self.scale))
        gate, up = self.gate_up_proj(self.post_attention_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_int4: nn.Module | None = None  # a 4-bit copy of the tied head for 1-2 rows (models/int4_cpu.py)
        self.rotary = RotaryEmbedding(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: KVCache,
    ) -> torch.Tensor:
        """[T] token ids and position ids -> final hidden states [len(attn.logits_indices), hidden]."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, attn, kv)
        return self.norm(x[attn.logits_indices])

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        if self.head_int4 is not None and hidden.shape[0] <= self.head_int4.max_rows:
            return self.head_int4(hidden)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
