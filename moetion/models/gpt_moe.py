"""A small GPT-style MoE language model as a layer list: embedding, attention + MoE blocks, head.

The token embedding and the LM head share one weight through ``TiedLayerSpec("embed", ...)``, the
classic case of a weight living on the first and the last pipeline stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moetion.module import LayerSpec, TiedLayerSpec
from moetion.moe import MoELayer
from moetion.random import Dropout


@dataclass
class GPTMoEConfig:
    vocab_size: int = 256
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    d_hidden: int = 128
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    router_noise: float = 0.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)


def lm_head(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection reuses the token embedding's weight."""
    return F.linear(hidden, embedding.weight)


class PositionalEmbedding(nn.Module):
    def __init__(self, seq_len: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.weight[: x.shape[-2]])


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / (d // self.n_heads) ** 0.5)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = self.attn_dropout(torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class MoEBlock(nn.Module):
    """Pre-norm transformer block whose feed-forward is a Mixture of Experts."""

    def __init__(self, config: GPTMoEConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.dropout)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.moe = MoELayer(
            config.d_model,
            config.d_hidden,
            config.num_experts,
            top_k=config.top_k,
            capacity_factor=config.capacity_factor,
            aux_loss_coef=config.aux_loss_coef,
            router_noise=config.router_noise,
        )
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.moe(self.norm2(x)))


def build_gpt_moe_layers(config: GPTMoEConfig) -> list[LayerSpec]:
    """The model as a layer list: tied embedding, positions, ``n_layers`` MoE blocks, norm, head."""
    return [
        TiedLayerSpec("embed", TokenEmbedding, config.vocab_size, config.d_model),
        LayerSpec(PositionalEmbedding, config.seq_len, config.d_model, config.dropout),
        *(LayerSpec(MoEBlock, config) for _ in range(config.n_layers)),
        LayerSpec(nn.LayerNorm, config.d_model),
        TiedLayerSpec("embed", TokenEmbedding, config.vocab_size, config.d_model, forward_fn=lm_head),
    ]


def gpt_moe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the compute precision."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
