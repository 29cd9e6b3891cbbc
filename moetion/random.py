"""Randomness that replays: every draw comes from a generator state keyed by where it happens.

The engine runs each unit of work (a micro-batch's forward or backward on a stage) inside
:func:`moetion.determinism.unit_of_work`, which opens a :func:`step_context` and sets torch's
default generators to a state derived from the job seed and the unit's coordinates. The pipeline
module narrows the context to each layer, and entering a layer seeds those generators again from
``(seed, iteration, micro-batch, layer)`` (and restores them when the layer ends). So moetion's own
layers (which draw through :func:`generator`) and torch's (``nn.Dropout``, ``torch.rand``) draw the
same bits in training, in a replay in a fresh process, in the single-process reference, and on a
differently partitioned pipeline; and ``torch.utils.checkpoint``, which stashes and restores the
default generators around its recomputation, repeats the forward's draws exactly.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn

from moetion.errors import MoetionError

_MASK64 = (1 << 64) - 1

# Domains keep seeds for different purposes apart even when the other parts coincide.
DOMAIN_INIT = 1
DOMAIN_DROPOUT = 2
DOMAIN_DATA = 3
DOMAIN_UNIT = 4


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
    inside the model use it so they are scaled exactly like the main loss. ``generators`` are
    torch's default generators that entering a layer seeds (empty: leave them alone).
    """

    seed: int
    iteration: int
    micro_batch: int
    loss_scale: float
    layer: int | None = None
    generators: tuple[torch.Generator, ...] = field(default_factory=lambda: (torch.default_generator,), repr=False)

    def for_layer(self, layer: int) -> "StepContext":
        return replace(self, layer=layer)


_current: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("moetion_step", default=None)


@contextlib.contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    """Makes ``context`` current for the code inside the ``with`` block.

    With a layer set, it also seeds ``context.generators`` from (seed, iteration, micro-batch,
    layer) for the block and restores their previous states after it.
    """
    token = _current.set(context)
    try:
        if context.layer is None:
            yield context
        else:
            seed = derive_seed(DOMAIN_DROPOUT, context.seed, context.iteration, context.micro_batch, context.layer)
            with seeded(context.generators, seed):
                yield context
    finally:
        _current.reset(token)


@contextlib.contextmanager
def seeded(generators: tuple[torch.Generator, ...], seed: int) -> Iterator[None]:
    """Seeds ``generators`` for the block and gives them back their previous states after it."""
    saved = [g.get_state() for g in generators]
    for g in generators:
        g.manual_seed(seed)
    try:
        yield
    finally:
        for g, state in zip(generators, saved):
            g.set_state(state)


def default_generator(device: torch.device | str) -> torch.Generator:
    """torch's default generator of ``device``: what ``torch.rand`` and ``nn.Dropout`` draw from."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    raise MoetionError(f"moetion manages the generators of cpu and cuda devices; this draw is on {device}")


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
    """The generator a moetion layer draws from: torch's default generator of ``device``.

    Inside a layer it was seeded from (seed, iteration, micro-batch, layer); draws within one layer
    consume one stream in program order, shared with torch's own ops, which is deterministic. In
    a checkpoint's recomputation torch has restored the state the forward saw.
    """
    context = current()
    gen = default_generator(device)
    if context.generators and gen not in context.generators:
        raise MoetionError(
            f"a moetion layer draws on {torch.device(device)} but the step seeds only the generators of "
            f"{[g.device.type for g in context.generators]}: pass the stage's device to unit_of_work"
        )
    return gen


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
