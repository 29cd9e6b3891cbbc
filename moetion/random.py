"""Randomness that replays: every draw comes from a generator keyed by where it happens.

During training the engine opens a :func:`step_context` for each (iteration, micro-batch); the
pipeline module narrows it to each layer. A layer that needs randomness (dropout, router noise)
calls :func:`generator`, which returns a ``torch.Generator`` seeded from
``(seed, iteration, micro-batch, layer)``. Ambient global RNG state is never read, so a replay in a
fresh process, or the same layer on a differently partitioned pipeline, draws the same numbers.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from moetion.errors import MoetionError

_MASK64 = (1 << 64) - 1

# Domains keep seeds for different purposes apart even when the other parts coincide.
DOMAIN_INIT = 1
DOMAIN_DROPOUT = 2
DOMAIN_DATA = 3


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from integers and strings, identical on every machine and process."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
        state = _splitmix64((state ^ (part & _MASK64)) & _MASK64)
    return state >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class StepContext:
    """Where the current forward pass runs: the key of its random draws and its loss scale.

    ``micro_batch`` is the global micro-batch index (unique across data-parallel replicas), and
    ``loss_scale`` the factor applied to each micro-batch's loss (1/M): auxiliary losses injected
    inside the model use it so they are scaled exactly like the main loss.
    """

    seed: int
    iteration: int
    micro_batch: int
    loss_scale: float
    layer: int | None = None
    _generator: torch.Generator | None = field(default=None, repr=False)

    def for_layer(self, layer: int) -> "StepContext":
        return StepContext(self.seed, self.iteration, self.micro_batch, self.loss_scale, layer)


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("moetion_step", default=None)


@contextlib.contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    """Makes ``context`` current for the code inside the ``with`` block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current() -> StepContext:
    """The active step context; raises if a layer draws randomness outside of training steps."""
    context = _current.get()
    if context is None:
        raise MoetionError(
            "a moetion layer needs randomness but no step context is active: run training through "
            "engine.train_batch(), or wrap the forward pass in moetion.random.step_context(...)"
        )
    return context


def generator(device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for the current (seed, iteration, micro-batch, layer); created on first use.

    Draws within one layer consume one stream in program order, which is deterministic.
    """
    context = current()
    if context.layer is None:
        raise MoetionError("random draws must happen inside a layer run by PipelineModule")
    if context._generator is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(
            derive_seed(DOMAIN_DROPOUT, context.seed, context.iteration, context.micro_batch, context.layer)
        )
        context._generator = gen
    return context._generator


class Dropout(nn.Module):
    """Dropout whose mask comes from :func:`generator`, so a replay reproduces it bit for bit."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        keep.bernoulli_(1.0 - self.p, generator=generator(x.device))
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"
