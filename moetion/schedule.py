"""The 1F1B training schedule as data: a pure generator of instructions per stage.

A schedule never touches a process or a tensor, so tests can simulate every stage's stream together
and prove it deadlock-free. The engine executes the instructions through a dispatch table.

Backward passes run in micro-batch order 0..M-1 on every stage, which fixes the order in which
gradients accumulate (an exactness requirement: a different order changes the last bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Instruction:
    """Base of all instructions; ``micro_batch`` is None for per-iteration instructions."""

    micro_batch: int | None = None


@dataclass(frozen=True)
class LoadMicroBatch(Instruction):
    """Read inputs (first stage) and/or labels (last stage) of a micro-batch from the data source."""


@dataclass(frozen=True)
class RecvActivation(Instruction):
    """Receive the previous stage's output for a micro-batch."""


@dataclass(frozen=True)
class ForwardPass(Instruction):
    """Run this stage's layers (and the loss on the last stage) for a micro-batch."""


@dataclass(frozen=True)
class SendActivation(Instruction):
    """Send this stage's output for a micro-batch to the next stage (non-blocking)."""


@dataclass(frozen=True)
class RecvGrad(Instruction):
    """Receive the gradient of this stage's output for a micro-batch from the next stage."""


@dataclass(frozen=True)
class BackwardPass(Instruction):
    """Back-propagate a micro-batch, accumulating weight gradients."""


@dataclass(frozen=True)
class SendGrad(Instruction):
    """Send the gradient of this stage's input for a micro-batch to the previous stage."""


@dataclass(frozen=True)
class WaitSends(Instruction):
    """Wait until every send of the iteration has completed: their buffers may then be freed."""


@dataclass(frozen=True)
class ReduceTiedGrads(Instruction):
    """Sum gradients of weights shared between stages (embedding and head)."""


@dataclass(frozen=True)
class ReduceGrads(Instruction):
    """Average gradients across the data-parallel replicas of this stage."""


@dataclass(frozen=True)
class OptimizerStep(Instruction):
    """Global grad-norm, clip, set the iteration's LR and step: the iteration's commit point."""


def train_schedule(*, stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
    """Yields one iteration of 1F1B for ``stage``.

    Stage ``s`` first runs ``num_stages - s - 1`` warm-up forwards, then alternates one forward and
    one backward, then drains the remaining backwards. Sends are non-blocking; receives block.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} outside a pipeline of {num_stages} stages")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    first, last = stage == 0, stage == num_stages - 1

    def forward(m: int) -> Iterator[Instruction]:
        if first or last:
            yield LoadMicroBatch(m)
        if not first:
            yield RecvActivation(m)
        yield ForwardPass(m)
        if not last:
            yield SendActivation(m)

    def backward(m: int) -> Iterator[Instruction]:
        if not last:
            yield RecvGrad(m)
        yield BackwardPass(m)
        if not first:
            yield SendGrad(m)

    warmup = min(num_stages - stage - 1, micro_batches)
    for m in range(warmup):
        yield from forward(m)
    for m in range(warmup, micro_batches):
        yield from forward(m)
        yield from backward(m - warmup)
    for m in range(micro_batches - warmup, micro_batches):
        yield from backward(m)
    yield WaitSends()
    yield ReduceTiedGrads()
    yield ReduceGrads()
    yield OptimizerStep()
