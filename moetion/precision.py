"""Compute precision: which weights forward reads, and how their gradients reach the fp32 masters.

Under ``fp32`` the stage module is both master and compute copy. Under ``bf16`` forward and
backward run on a bf16 copy; after each micro-batch its gradients are added, in fp32 and in
micro-batch order, to the masters' gradients; after each optimizer step the copy is refreshed from
the masters. The optimizer only ever sees fp32 masters.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from moetion.config import PRECISIONS
from moetion.errors import ConfigError


class StagePrecision:
    """Owns the compute copy of a stage module for one precision."""

    def __init__(self, master: nn.Module, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.master = master
        self.precision = precision
        if precision == "fp32":
            self.compute = master
        else:
            self.compute = copy.deepcopy(master).to(torch.bfloat16)
        self._pairs = list(zip(master.parameters(), self.compute.parameters()))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else torch.bfloat16

    def after_backward(self) -> None:
        """Moves this micro-batch's compute gradients into the fp32 master gradients."""
        if self.compute is self.master:
            return
        for master, compute in self._pairs:
            if compute.grad is None:
                continue
            grad = compute.grad.float()
            if master.grad is None:
                master.grad = grad
            else:
                master.grad.add_(grad)
            compute.grad = None

    def discard_grads(self) -> None:
        """Drops the compute copy's gradients of an abandoned iteration."""
        if self.compute is not self.master:
            for _, compute in self._pairs:
                compute.grad = None

    def after_step(self) -> None:
        """Refreshes the compute weights of the masters that trained (frozen operators of a replay
        keep the compute weights they were given)."""
        self._refresh(only_trainable=True)

    def refresh(self) -> None:
        """Refreshes every compute weight from its master, after the masters were loaded."""
        self._refresh(only_trainable=False)

    def _refresh(self, *, only_trainable: bool) -> None:
        if self.compute is self.master:
            return
        with torch.no_grad():
            for master, compute in self._pairs:
                if master.requires_grad or not only_trainable:
                    compute.copy_(master)
