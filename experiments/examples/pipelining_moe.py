"""A small MoE transformer split with torch.distributed.pipelining, made recoverable by moetion.

The experts of each MoE layer are stacked tensors (the grouped layout: ``w_in[E, d, h]``,
``w_out[E, h, d]``, with a ``num_experts`` attribute, so moetion snapshots them per expert). Each
rank builds its stage as torch.distributed.pipelining users do, with two changes: the stage is a
``moetion.pipelining.LoggedStage`` with static example shapes, and the loop calls
``engine.train_batch`` instead of ``schedule.step`` and ``optimizer.step``.

Run it with a kill and the bitwise verdict (fault-free run first, then the same run with the kill):

    moetion faults --script experiments/examples/pipelining_moe.py --nproc 3 --kill stage=1,iter=6,phase=backward

or train once under the recovering supervisor: ``moetion launch --nproc 3 experiments/examples/pipelining_moe.py``.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import Schedule1F1B

import moetion
from moetion import pipelining

VOCAB, SEQ, D_MODEL, HIDDEN, EXPERTS, HEADS = 256, 16, 32, 64, 4, 4
MICRO_BATCH, MICRO_BATCHES, ITERATIONS = 2, 4, 12


class StackedMoE(nn.Module):
    """Top-1 MoE whose experts are stacked tensors; the router's noise comes from moetion.random, so
    a replay draws the same noise, and a buffer counts the tokens routed to each expert."""

    def __init__(self, router_noise: float) -> None:
        super().__init__()
        self.num_experts, self.router_noise = EXPERTS, router_noise
        self.router = nn.Linear(D_MODEL, EXPERTS, bias=False)
        self.w_in = nn.Parameter(torch.randn(EXPERTS, D_MODEL, HIDDEN) * D_MODEL ** -0.5)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, HIDDEN, D_MODEL) * HIDDEN ** -0.5)
        self.register_buffer("routed", torch.zeros(EXPERTS, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, D_MODEL)
        logits = self.router(tokens)
        if self.training and self.router_noise:
            logits = logits + self.router_noise * torch.randn(logits.shape, generator=moetion.random.generator())
        gate, expert = F.softmax(logits, dim=-1).max(dim=-1)
        self.routed += torch.bincount(expert, minlength=EXPERTS)
        out = torch.zeros_like(tokens)
        for e in range(EXPERTS):  # every expert in a fixed order: the same sums in training and replay
            chosen = expert == e
            hidden = F.gelu(tokens[chosen] @ self.w_in[e])
            out[chosen] = (hidden @ self.w_out[e]) * gate[chosen, None]
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, router_noise: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attention = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.moe = StackedMoE(router_noise)
        self.register_buffer("causal", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=self.causal, need_weights=False)[0]
        return x + self.moe(self.norm2(x))


class Stage(nn.Module):
    """Stage ``s`` of ``n``: the embedding on the first, a block on each, the head on the last."""

    def __init__(self, stage: int, num_stages: int, *, router_noise: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL) if stage == 0 else None
        self.block = Block(router_noise)
        self.head = nn.Sequential(nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, VOCAB)) if stage == num_stages - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        x = self.block(x)
        return self.head(x) if self.head is not None else x


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def example(stage: int, num_stages: int, *, output: bool) -> torch.Tensor:
    """One micro-batch's static shape at a stage boundary (token ids in, logits out)."""
    if stage == 0 and not output:
        return torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
    if stage == num_stages - 1 and output:
        return torch.empty(MICRO_BATCH, SEQ, VOCAB)
    return torch.empty(MICRO_BATCH, SEQ, D_MODEL, requires_grad=True)  # crosses a boundary: gradients flow back


def main() -> None:
    config = {"seed": 1, "micro_batches": MICRO_BATCHES, "grad_clip": 1.0, "threads": 1,
              "lr_schedule": {"warmup_iterations": 3, "decay": "cosine", "decay_iterations": ITERATIONS},
              "snapshot": {"enabled": True, "window": 3}, "upstream_log": {"enabled": True}}
    job = pipelining.join(config)
    torch.manual_seed(100 + job.stage)  # each stage's own initial weights
    module = Stage(job.stage, job.num_stages)
    stage = pipelining.LoggedStage(module, job.stage, job.num_stages, job.device,
                                   input_args=example(job.stage, job.num_stages, output=False),
                                   output_args=example(job.stage, job.num_stages, output=True))
    schedule = Schedule1F1B(stage, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    engine = pipelining.attach(job, stage, schedule, optimizer=optimizer, loss_fn=loss_fn)
    data = moetion.ByteCorpus(moetion.data.stdlib_corpus(max_bytes=1 << 16), seq_len=SEQ, micro_batch_size=MICRO_BATCH)
    while engine.iteration < ITERATIONS:  # not range(): a replacement joins mid-run
        loss = engine.train_batch(data)
        if job.stage == job.num_stages - 1:
            print(f"iteration {engine.iteration:3d}  loss {loss:.4f}", file=sys.stderr, flush=True)
    engine.close()


if __name__ == "__main__":
    main()
