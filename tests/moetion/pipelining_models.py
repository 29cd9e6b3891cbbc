"""A tiny model split into stages for torch.distributed.pipelining, shared by the tests and ranks."""
import torch
from torch import nn

import moetion

WIDTH = 8
MICRO_BATCH = 2
MICRO_BATCHES = 4


class Block(nn.Module):
    """Linear + tanh with a buffer its forward changes (as an MoE layer's routing counts)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.dropout(torch.tanh(self.linear(x)))


def stage_module(stage: int, num_stages: int, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Stage ``stage``'s two blocks, initialised from a seed of their own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + stage)
        return nn.Sequential(Block(dropout), Block(dropout)).to(dtype)


def example(stage: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One micro-batch's input (and output) of a stage, as static shapes for PipelineStage."""
    return torch.empty(MICRO_BATCH, WIDTH, dtype=dtype, requires_grad=stage > 0)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def data(iterations: int, dtype: torch.dtype = torch.float32) -> moetion.TensorDataSource:
    g = torch.Generator().manual_seed(7)
    rows = iterations * MICRO_BATCHES * MICRO_BATCH
    return moetion.TensorDataSource(torch.randn(rows, WIDTH, generator=g).to(dtype),
                                    torch.randn(rows, WIDTH, generator=g).to(dtype),
                                    micro_batch_size=MICRO_BATCH, micro_batches_per_iteration=MICRO_BATCHES)


def optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.01)
