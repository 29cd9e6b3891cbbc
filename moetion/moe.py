"""The built-in top-k Mixture-of-Experts layer.

Deterministic by construction: router noise comes from the step's generator, capacity dropping
gives priority by (choice rank, token position) as in GShard, and expert outputs are combined in a
fixed order (first choice, then second...). Dispatch and combine are gathers only, never
``index_add``/``scatter_add``: on CUDA those accumulate with atomics in an order that changes from
run to run (unless torch's deterministic mode swaps them), which would break bitwise replay. The
gathers' backward accumulates with ``index_put_(accumulate=True)``, deterministic on CPU and CUDA. The load-balancing loss (Switch Transformer's) enters the backward pass through
an identity op on the output, so the loss is never threaded through the pipeline's activations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetion import random as mrandom
from moetion.routing import report_token_counts


class Expert(nn.Module):
    """One feed-forward expert: Linear -> GELU -> Linear."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Router(nn.Module):
    """The gate: a linear map from tokens to expert logits, with optional multiplicative jitter."""

    def __init__(self, d_model: int, num_experts: int, *, noise: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise > 0:
            jitter = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            jitter.uniform_(1.0 - self.noise, 1.0 + self.noise, generator=mrandom.generator(x.device))
            x = x * jitter.to(x.dtype)
        return self.gate(x).float()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also feeds ``scale`` as the gradient of ``aux``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=grad_output.device)
        return grad_output, aux_grad, None


def attach_aux_loss(output: torch.Tensor, aux: torch.Tensor, *, coef: float) -> torch.Tensor:
    """Adds ``coef * aux`` (a scalar load-balancing loss) to the training objective from inside a layer.

    Returns ``output`` unchanged (an identity op); its backward feeds ``coef`` times the main loss's
    scale (``1/micro_batches``) as the gradient of ``aux``, so the auxiliary loss enters backward on
    the stage that computed it and never crosses a stage boundary. Call it in ``forward`` on the
    layer's output, while training, as the built-in :class:`MoELayer` does.
    """
    return _AttachAuxLoss.apply(output, aux, coef * mrandom.current().loss_scale)


class MoELayer(nn.Module):
    """Top-k routed experts with a capacity limit and a load-balancing auxiliary loss.

    Args:
        capacity_factor: each expert takes at most ``ceil(factor * tokens * top_k / experts)``
            tokens per micro-batch; the rest of its assignments are dropped (the residual
            connection around the layer carries those tokens on).
        aux_loss_coef: weight of the Switch load-balancing loss ``E * sum_e f_e * P_e``.

    It reports the tokens routed to each expert (before capacity dropping) with
    :func:`~moetion.routing.report_token_counts`; sparse checkpointing orders experts by this popularity.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        aux_loss_coef: float = 0.01,
        router_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef = aux_loss_coef
        self.router = Router(d_model, num_experts, noise=router_noise)
        self.experts = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(num_experts))
        self.last_aux_loss = torch.zeros(())
        self.last_dropped = torch.zeros((), dtype=torch.int64)

    def capacity(self, tokens: int) -> int:
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        n = tokens.shape[0]
        probs = torch.softmax(self.router(tokens), dim=-1)  # fp32 [n, E]
        weights, choices = probs.topk(self.top_k, dim=-1)  # [n, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)

        # Assignment order: every token's first choice before any second choice, then by position.
        expert_of = choices.t().reshape(-1)  # [k*n]
        token_of = torch.arange(n, device=x.device).repeat(self.top_k)
        weight_of = weights.t().reshape(-1)
        one_hot = F.one_hot(expert_of, self.num_experts)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        kept = position < self.capacity(n)
        with torch.no_grad():
            report_token_counts(self, torch.bincount(expert_of, minlength=self.num_experts))
            self.last_dropped = (~kept).sum()

        out = self._dispatch_and_combine(tokens, expert_of, token_of, weight_of, kept)

        if self.training and self.aux_loss_coef > 0:
            fraction = torch.bincount(choices[:, 0], minlength=self.num_experts).float() / n
            aux = self.num_experts * (fraction * probs.mean(dim=0)).sum()
            self.last_aux_loss = aux.detach()
            out = attach_aux_loss(out, aux, coef=self.aux_loss_coef)
        return out.reshape(shape)

    def _dispatch_and_combine(self, tokens: torch.Tensor, expert_of: torch.Tensor, token_of: torch.Tensor,
                              weight_of: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Runs each expert on its kept assignments and sums every token's weighted outputs.

        Assignments (choice-major, ``k * n``) are sorted by expert, stable so each expert sees its
        tokens in assignment order; the outputs come back to assignments by a gather from
        ``[outputs; 0]`` (a dropped assignment reads the zero row), and a token's ``k`` results
        are added in choice order.
        """
        n, width = tokens.shape
        chosen = kept.nonzero().squeeze(1)
        order = chosen[torch.argsort(expert_of[chosen], stable=True)]
        per_expert = torch.bincount(expert_of[order], minlength=self.num_experts).tolist()
        inputs = tokens[token_of[order]]
        outputs = [
            self.experts[e](chunk) for e, chunk in enumerate(inputs.split(per_expert)) if per_expert[e] > 0
        ]
        dtype = outputs[0].dtype if outputs else tokens.dtype
        weighted = torch.cat([*outputs, tokens.new_zeros((1, width), dtype=dtype)])
        weighted = weighted * torch.cat([weight_of[order], weight_of.new_zeros(1)]).unsqueeze(-1).to(dtype)
        row_of = torch.full_like(expert_of, order.numel())  # dropped assignments read the zero row
        row_of[order] = torch.arange(order.numel(), device=tokens.device)
        contributions = weighted[row_of].view(self.top_k, n, width)
        out = contributions[0]
        for choice in contributions[1:]:
            out = out + choice
        return out.to(tokens.dtype)
