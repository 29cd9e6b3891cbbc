"""Models written for the tests (not imported from any model library): state besides parameters and
MoE layers of the user's own layouts, as a new user would bring them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import moetion

D_MODEL = 8
EXPERTS = 4


class RegressionData:
    """Deterministic float inputs and targets per (iteration, micro-batch), any number of iterations."""

    def __init__(self, *, rows: int = 6, width: int = D_MODEL) -> None:
        self.rows, self.width = rows, width

    def micro_batch(self, iteration: int, index: int):
        g = torch.Generator().manual_seed(1_000_003 * iteration + index)
        x = torch.randn(self.rows, self.width, generator=g)
        return x, torch.tanh(x.flip(-1)) + 0.1 * torch.randn(self.rows, self.width, generator=g)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


class BufferedBlock(nn.Module):
    """A block whose state is more than its trainable weights: BatchNorm running statistics, a
    frozen parameter, and a router whose expert-bias buffer (auxiliary-loss-free load balancing,
    DeepSeek-V3 style) is moved by an optimizer step pre-hook from the load counted in forward."""

    def __init__(self, d: int = D_MODEL, experts: int = EXPERTS) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.Parameter(torch.randn(experts, d, d) * 0.3)
        self.frozen_scale = nn.Parameter(torch.linspace(0.5, 1.5, d), requires_grad=False)
        self.register_buffer("expert_bias", torch.zeros(experts))
        self.register_buffer("load", torch.zeros(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.lin(x))) * self.frozen_scale
        logits = self.gate(h)
        choice = (logits.detach() + self.expert_bias).argmax(-1)
        with torch.no_grad():
            self.load += torch.bincount(choice, minlength=self.load.numel()).to(self.load.dtype)
        weight = torch.softmax(logits, -1).gather(-1, choice[:, None])
        routed = torch.einsum("nd,nde->ne", h, self.experts[choice]) * weight
        return x + routed

    @torch.no_grad()
    def balance(self, rate: float = 1e-2) -> None:
        """Pushes the bias of under-loaded experts up, of over-loaded ones down; resets the count."""
        self.expert_bias += rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


def buffered_layers(stages: int) -> list[moetion.LayerSpec]:
    """Two blocks a stage: two operators, so a replay runs one of them frozen."""
    return [moetion.LayerSpec(BufferedBlock) for _ in range(2 * stages)]


def balance_before_each_step(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Registers the expert-bias update as an optimizer step pre-hook, as a user would."""
    blocks = [m for m in module.modules() if isinstance(m, BufferedBlock)]

    def balance(*_) -> None:
        for block in blocks:
            block.balance()
    optimizer.register_step_pre_hook(balance)
