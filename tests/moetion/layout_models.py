"""Models written for the tests (not imported from any model library): state besides parameters and
MoE layers of the user's own layouts, as a new user would bring them."""
from __future__ import annotations

import os

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


class LeftoverPerProcess(nn.Module):
    """A weight allocated with ``torch.empty`` and never initialised: leftover memory that differs
    between processes (made so here, as the allocator's leftovers are not reproducible)."""

    def __init__(self, d: int = D_MODEL) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.empty(d))
        self.scale.data.fill_(1.0 + os.getpid() % 1000 / 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def leftover_layers(stages: int) -> list[moetion.LayerSpec]:
    return [moetion.LayerSpec(LeftoverPerProcess) for _ in range(2 * stages)]


# -- MoE layers of the user's own layouts ---------------------------------------------------------
HIDDEN = 16
TOP_K = 2
CAPACITY = 1.0


def top_k_dispatch(logits: torch.Tensor, experts: int):
    """Top-2 routing with a capacity per expert (first choices first, then by position):
    (probabilities, expert of each assignment, its token, its weight, kept)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, choices = probs.topk(TOP_K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    n = logits.shape[0]
    expert_of = choices.t().reshape(-1)
    token_of = torch.arange(n).repeat(TOP_K)
    one_hot = F.one_hot(expert_of, experts)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1
    kept = position < int(CAPACITY * n * TOP_K / experts + 0.999)
    return probs, choices, expert_of, token_of, weights.t().reshape(-1), kept


def switch_aux_loss(probs: torch.Tensor, choices: torch.Tensor, experts: int) -> torch.Tensor:
    fraction = torch.bincount(choices[:, 0], minlength=experts).float() / probs.shape[0]
    return experts * (fraction * probs.mean(0)).sum()


class SwiGLUExpert(nn.Module):
    """The user's own expert class (not moetion's)."""

    def __init__(self, d: int = D_MODEL, h: int = HIDDEN) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d, h, bias=False)
        self.w_up = nn.Linear(d, h, bias=False)
        self.w_down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class ListMoE(nn.Module):
    """A ModuleList of user-class experts and a gate: found by detection. ``h`` is the hidden size of
    a two-matrix expert of the same parameter count (SwiGLU's three matrices get ``2h/3``)."""

    def __init__(self, d: int = D_MODEL, experts: int = EXPERTS, h: int = HIDDEN) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(d, 2 * h // 3) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, expert_of, token_of, weight_of, kept = top_k_dispatch(self.gate(x), len(self.experts))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = kept & (expert_of == e)
            index = token_of[mask]
            out = out.index_add(0, index, expert(x[index]) * weight_of[mask, None])
        return x + out


class GroupedMoE(nn.Module):
    """Experts stacked in tensors with a leading expert dimension (a grouped-GEMM layout), top-2 with
    capacity, its token counts and a load-balancing loss through moetion's public hooks: found by
    detection."""

    def __init__(self, d: int = D_MODEL, experts: int = EXPERTS, h: int = HIDDEN, aux_coef: float = 0.01) -> None:
        super().__init__()
        self.num_experts, self.aux_coef = experts, aux_coef
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, d, h) * d ** -0.5)
        self.w2 = nn.Parameter(torch.randn(experts, h, d) * h ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, choices, expert_of, token_of, weight_of, kept = top_k_dispatch(self.router(x), self.num_experts)
        moetion.report_token_counts(self, torch.bincount(expert_of, minlength=self.num_experts))
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            mask = kept & (expert_of == e)
            index = token_of[mask]
            out = out.index_add(0, index, F.gelu(x[index] @ self.w1[e]) @ self.w2[e] * weight_of[mask, None])
        if self.training:
            out = moetion.attach_aux_loss(out, switch_aux_loss(probs, choices, self.num_experts), coef=self.aux_coef)
        return x + out


class DeclaredMoE(nn.Module):
    """Stacked experts under names detection cannot see (no ``num_experts``, a ``scorer``), declared
    through ``moetion.experts``."""

    def __init__(self, d: int = D_MODEL, experts: int = EXPERTS, h: int = HIDDEN) -> None:
        super().__init__()
        self.n_routed = experts
        self.scorer = nn.Linear(d, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, d, h) * d ** -0.5)
        self.down = nn.Parameter(torch.randn(experts, h, d) * h ** -0.5)
        moetion.experts(self, stacked=["up", "down"], router=["scorer"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, expert_of, token_of, weight_of, kept = top_k_dispatch(self.scorer(x), self.n_routed)
        out = torch.zeros_like(x)
        for e in range(self.n_routed):
            mask = kept & (expert_of == e)
            index = token_of[mask]
            out = out.index_add(0, index, torch.tanh(x[index] @ self.up[e]) @ self.down[e] * weight_of[mask, None])
        return x + out


def layout_layers(stages: int) -> list[moetion.LayerSpec]:
    """Every stage holds all three layouts (and a block with buffers), so one run covers them all."""
    kinds = [ListMoE, GroupedMoE, DeclaredMoE, BufferedBlock]
    per_stage = 3
    return [moetion.LayerSpec(kinds[(s + i) % len(kinds)]) for s in range(stages) for i in range(per_stage)]
