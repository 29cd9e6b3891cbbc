"""Gradient arithmetic of the optimizer step, in one place for the engine and the reference.

The global norm is built from per-stage sums of squares added in stage order, never from a
collective's arbitrary reduction order, so every rank and the single-process reference get the
same bits.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

_EPS = 1e-6


def fill_missing_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Gives every trainable parameter a gradient (zeros where backward never reached it).

    An expert that received no token still gets an optimizer step, as under data parallelism,
    so every replica and every replay treats the same parameters the same way.
    """
    for p in params:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def squared_norm(params: Iterable[torch.nn.Parameter], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of squared gradient entries of ``params`` as an fp32 scalar, in parameter order."""
    return sum_of_squares(param_norms(params), device=device)


def param_norms(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each gradient's fp32 2-norm, in parameter order (parameters without a gradient skipped)."""
    return [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]


def sum_of_squares(norms: Sequence[torch.Tensor], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """The squared norm of a list of per-parameter norms, added in list order."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(list(norms)).square().sum()


def total_norm(stage_squares: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global norm from per-stage squared norms, added in stage order."""
    total = stage_squares[0]
    for sq in stage_squares[1:]:
        total = total + sq
    return total.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float | None) -> float:
    """The factor gradients are multiplied by (1.0 when no clipping is needed)."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (float(norm) + _EPS))


def scale_grads(params: Iterable[torch.nn.Parameter], factor: float) -> None:
    if factor == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def flatten_grads(params: Sequence[torch.nn.Parameter], extra: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """One flat buffer of ``params``' gradients (then ``extra``), so replicas reduce in one collective."""
    return torch.cat([p.grad.reshape(-1) for p in params] + [e.reshape(-1) for e in extra])


def unflatten_mean(params: Sequence[torch.nn.Parameter], flat: torch.Tensor, *, replicas: int) -> torch.Tensor:
    """Writes the summed gradients back divided by ``replicas``; returns the rest of ``flat`` (the extras).

    Training and replay both average this way (sum, then divide), so their bits agree.
    """
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad)).div_(replicas)
        offset += p.numel()
    return flat[offset:]
