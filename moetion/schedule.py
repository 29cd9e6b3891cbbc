"""The training schedules as data: pure generators of instructions per stage.

A schedule never touches a process or a tensor, so tests can simulate every stage's stream together
and prove it deadlock-free. The engine executes the instructions through a dispatch table. Besides
moetion's own 1F1B, :class:`StageSchedule` describes the iterations of a
``torch.distributed.pipelining`` schedule (GPipe or 1F1B, gradients divided after backward), so
that a replay of such a stage runs the same instructions in the same order as its training did.

Backward passes run in micro-batch order 0..M-1 on every stage, which fixes the order in which
gradients accumulate (an exactness requirement: a different order changes the last bits).
"""
from __future__ import annotations

import enum
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
class DivideGrads(Instruction):
    """Divide the accumulated weight gradients by the number of micro-batches (after the last backward)."""


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


class Order(enum.Enum):
    """The order of a stage's micro-batch instructions within an iteration."""

    ONE_F_ONE_B = "1f1b"  # warm-up forwards, then one forward and one backward, then the drain
    FILL_DRAIN = "gpipe"  # every forward, then every backward


class LossScaling(enum.Enum):
    """How the mean over micro-batches enters the gradients; training and replay must agree bit for bit."""

    LOSS = "loss"  # each micro-batch's loss times 1/M before its backward (moetion's runtime)
    GRADS = "grads"  # the summed gradients divided by M after the last backward (torch pipelining's scale_grads)
    NONE = "none"  # summed, not averaged (torch pipelining with scale_grads=False)


@dataclass(frozen=True)
class StageSchedule:
    """What an iteration's instruction stream looks like; the default is moetion's own runtime."""

    order: Order = Order.ONE_F_ONE_B
    loss_scaling: LossScaling = LossScaling.LOSS

    def instructions(self, *, stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
        yield from micro_batch_instructions(self.order, stage=stage, num_stages=num_stages, micro_batches=micro_batches)
        if self.loss_scaling is LossScaling.GRADS:
            yield DivideGrads()
        yield from commit_instructions()


def train_schedule(*, stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
    """Yields one iteration of moetion's 1F1B for ``stage``."""
    return StageSchedule().instructions(stage=stage, num_stages=num_stages, micro_batches=micro_batches)


def commit_instructions() -> Iterator[Instruction]:
    """The per-iteration instructions after the last backward: the iteration's commit."""
    yield WaitSends()
    yield ReduceTiedGrads()
    yield ReduceGrads()
    yield OptimizerStep()


def micro_batch_instructions(order: Order, *, stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
    """Yields the micro-batch instructions of one iteration of ``stage``.

    1F1B: stage ``s`` first runs ``num_stages - s - 1`` warm-up forwards, then alternates one
    forward and one backward, then drains the remaining backwards (torch's ``Schedule1F1B``
    computes in this order too). Fill-drain (GPipe): every forward, then every backward. Sends are
    non-blocking; receives block. Backwards run in micro-batch order either way.
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

    warmup = micro_batches if order is Order.FILL_DRAIN else min(num_stages - stage - 1, micro_batches)
    for m in range(warmup):
        yield from forward(m)
    for m in range(warmup, micro_batches):
        yield from forward(m)
        yield from backward(m - warmup)
    for m in range(micro_batches - warmup, micro_batches):
        yield from backward(m)
