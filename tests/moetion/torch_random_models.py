"""Models that draw from torch's own generators, with and without activation checkpointing.

Written the way model libraries write them: ``nn.Dropout``, ``F.dropout``, a router with
``torch.rand`` jitter, and each block optionally under ``torch.utils.checkpoint`` (non-reentrant,
reentrant, or selective with ``create_selective_checkpoint_contexts``). Blocks also hold a
``moetion.random.Dropout``, whose recomputation in backward needs moetion's step context.
Imported by the tests and by the training scripts they launch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import moetion
from moetion.module import LayerSpec

D_MODEL, VOCAB, SEQ_LEN = 16, 256, 8
CHECKPOINTS = ("none", "non_reentrant", "reentrant", "selective")
_SAVED_IN_SELECTIVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: keep matmul outputs, recompute everything else (the draws too)."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_IN_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def run_checkpointed(mode: str, body, x: torch.Tensor, training: bool) -> torch.Tensor:
    if mode == "none" or not training:
        return body(x)
    if mode == "non_reentrant":
        return checkpoint(body, x, use_reentrant=False)
    if mode == "reentrant":
        return checkpoint(body, x, use_reentrant=True)
    if mode == "selective":
        contexts = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        return checkpoint(body, x, use_reentrant=False, context_fn=contexts)
    raise ValueError(f"unknown checkpoint mode {mode!r}")


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, D_MODEL)
        self.drop = nn.Dropout(0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.table(tokens))


class DropoutBlock(nn.Module):
    """A residual MLP with nn.Dropout, F.dropout, torch.rand noise and moetion's Dropout."""

    def __init__(self, checkpoint_mode: str = "none") -> None:
        super().__init__()
        self.checkpoint_mode = checkpoint_mode
        self.up = nn.Linear(D_MODEL, 2 * D_MODEL)
        self.down = nn.Linear(2 * D_MODEL, D_MODEL)
        self.drop = nn.Dropout(0.2)
        self.moetion_drop = moetion.random.Dropout(0.1)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.gelu(self.up(x)))
        h = F.dropout(h, 0.2, training=self.training)
        if self.training:
            h = h * (1.0 + 0.1 * (2.0 * torch.rand(h.shape, device=h.device) - 1.0))
        return x + self.moetion_drop(self.down(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_checkpointed(self.checkpoint_mode, self._body, x, self.training)


class JitterRouter(nn.Module):
    """A top-1 mixture of two experts whose gate input is jittered with torch.rand."""

    def __init__(self, checkpoint_mode: str = "none", *, experts: int = 2, noise: float = 0.2) -> None:
        super().__init__()
        self.checkpoint_mode, self.noise = checkpoint_mode, noise
        self.gate = nn.Linear(D_MODEL, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D_MODEL, D_MODEL) for _ in range(experts))

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        gate_in = x
        if self.training:
            gate_in = x * (1.0 + self.noise * (2.0 * torch.rand(x.shape, device=x.device) - 1.0))
        weight, choice = torch.softmax(self.gate(gate_in), dim=-1).max(dim=-1)
        out = x
        for e, expert in enumerate(self.experts):
            out = out + (choice == e).unsqueeze(-1) * weight.unsqueeze(-1) * expert(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_checkpointed(self.checkpoint_mode, self._body, x, self.training)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(D_MODEL, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def build_layers(checkpoints: tuple[str, ...], *, stages: int) -> list[LayerSpec]:
    """Every stage gets one DropoutBlock and one JitterRouter per entry of ``checkpoints``."""
    per_stage = [LayerSpec(cls, mode) for mode in checkpoints for cls in (DropoutBlock, JitterRouter)]
    return [LayerSpec(Embed), *(per_stage * stages), LayerSpec(Head)]


def build_module(checkpoints: tuple[str, ...], *, stages: int, stage_id: int | None = None) -> moetion.PipelineModule:
    """Balanced on blocks and routers, so each stage holds the same kinds of layers."""
    return moetion.PipelineModule(build_layers(checkpoints, stages=stages), stages, loss_fn=loss_fn,
                                  partition_method="type:DropoutBlock|JitterRouter", stage_id=stage_id, seed=5)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def data() -> moetion.ByteCorpus:
    return moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=SEQ_LEN, micro_batch_size=2, seed=3)
