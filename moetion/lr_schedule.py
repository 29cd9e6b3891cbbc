"""The learning-rate factor as a pure function of the iteration (see LRScheduleConfig)."""
from __future__ import annotations

import math

import torch

from moetion.config import LRScheduleConfig


def lr_factor(schedule: LRScheduleConfig, iteration: int) -> float:
    """Multiplier of the initial LR for the optimizer step of ``iteration`` (0-based)."""
    if iteration < schedule.warmup_iterations:
        return (iteration + 1) / schedule.warmup_iterations
    if schedule.decay == "constant":
        return 1.0
    progress = min(1.0, (iteration - schedule.warmup_iterations) / schedule.decay_iterations)
    if schedule.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return schedule.min_ratio + (1.0 - schedule.min_ratio) * shape


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Sets every param group's LR to its ``initial_lr`` times ``factor`` (training and replay alike)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
