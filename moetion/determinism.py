"""Units of work with their own generator state, and the strict determinism mode.

A unit of work is what one stage does for one micro-batch in one pass: its forward (with the loss
on the last stage) or its backward. Training, replay and the single-process reference run each
unit inside :func:`unit_of_work`, so every draw it makes, from moetion's layers or from torch's
default generators (``nn.Dropout``, ``F.dropout``, ``torch.rand``, ``torch.multinomial``...),
depends only on the job seed and the unit's coordinates, never on what the process did before:

- the state is derived from ``(seed, iteration, global micro-batch, stage, pass)``. The global
  micro-batch index is already unique across data-parallel replicas, so the replica adds nothing;
  stage and pass keep the streams of a stage's forward and backward, and of different stages,
  apart. Inside a layer, :func:`moetion.random.step_context` re-seeds from the layer instead;
- the caller's generator states are restored afterwards, so code between units (the training
  loop, a data loader) sees torch's generators as if moetion had never touched them;
- the backward unit makes the step context current too, so a checkpointed region recomputed in
  backward finds it; torch's checkpoint restores the generator states the forward saw.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
from typing import Iterator

import torch

from moetion import env
from moetion.config import Config, DeterminismConfig
from moetion.errors import ConfigError, NondeterministicOpError
from moetion.random import DOMAIN_UNIT, StepContext, default_generator, derive_seed, seeded, step_context

# What torch says when use_deterministic_algorithms(True) meets an op without such an implementation.
_TORCH_NONDETERMINISTIC = " does not have a deterministic implementation"
# cuBLAS is deterministic only with a fixed workspace; torch asks for this before the first matmul.
_CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the settings cuBLAS documents as reproducible

log = logging.getLogger(__name__)


class Pass(enum.Enum):
    """Which half of a micro-batch's work on a stage a unit is."""

    FORWARD = "forward"
    BACKWARD = "backward"


@contextlib.contextmanager
def unit_of_work(config: Config, *, stage: int, iteration: int, micro_batch: int, pass_: Pass,
                 device: torch.device | str = "cpu") -> Iterator[StepContext]:
    """Runs the block as one unit of work: step context current, torch's generators forked.

    ``micro_batch`` is the global index (``replica * M + m``); ``device`` is the stage's device,
    whose CUDA generator is forked beside the CPU one. Under ``determinism.strict`` an op without a
    deterministic implementation becomes a :class:`NondeterministicOpError` naming it and the unit.
    """
    generators = _generators(device) if config.determinism.torch_generators else ()
    seed = derive_seed(DOMAIN_UNIT, config.seed, iteration, micro_batch, stage, pass_.value)
    context = StepContext(config.seed, iteration, micro_batch, 1.0 / config.micro_batches, generators=generators)
    try:
        with seeded(generators, seed), step_context(context):
            yield context
    except RuntimeError as error:
        op = _nondeterministic_op(error)
        if op is None:
            raise
        raise NondeterministicOpError(
            f"{op} has no deterministic implementation on {torch.device(device)} (stage {stage}, iteration "
            f"{iteration}, micro-batch {micro_batch}, {pass_.value}) and determinism.strict is on: replace "
            "the op with a deterministic one, or turn strict off and accept that a replay may differ"
        ) from None


def enable_strict_mode(settings: DeterminismConfig) -> None:
    """Under ``strict``, makes torch refuse ops without a deterministic implementation.

    Process-wide, so call it once before the first iteration: training (:func:`moetion.initialize`)
    and the reference both do, so that both run the same (deterministic) kernels.
    """
    if not settings.strict:
        return
    name, value = _CUBLAS_WORKSPACE
    found = env.cublas_workspace()
    if found is not None and found not in _CUBLAS_DETERMINISTIC:
        raise ConfigError(f"determinism.strict needs {name} unset or one of {_CUBLAS_DETERMINISTIC}, "
                          f"found {found!r}: unset it and moetion sets {value!r}")
    if found is None and torch.cuda.is_initialized():
        log.warning("CUDA was initialised before moetion set %s=%s: cuBLAS handles made earlier may not "
                    "use it; set it in the environment before starting Python", name, value)
    os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True)


def check_device(settings: DeterminismConfig, device: torch.device) -> None:
    """What bitwise replay needs on the stage's device, checked once it is known (no-op on the CPU).

    On CUDA: cuDNN autotuning is switched off (it picks kernels by timing them, so a replacement
    process may pick other kernels than the process it replaces), and without ``strict`` a
    warning says that ops accumulating with atomics (``index_add_``, ``scatter_add_``, their use
    in backward passes) make a replay differ in the last bits.
    """
    if torch.device(device).type != "cuda":
        return
    if torch.backends.cudnn.benchmark:
        log.warning("torch.backends.cudnn.benchmark was on: moetion turns it off, because autotuned "
                    "kernels differ between processes and a replacement would not replay bit for bit")
        torch.backends.cudnn.benchmark = False
    if not settings.strict:
        log.warning("training on %s without determinism.strict: CUDA ops that accumulate with atomics "
                    "(index_add_, scatter_add_, and the backward of index_select/gather) make a replay "
                    "differ in the last bits; set determinism.strict to true to refuse them by name", device)


def _generators(device: torch.device | str) -> tuple[torch.Generator, ...]:
    """The CPU default generator, and the device's own when it is not the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return (torch.default_generator,)
    return torch.default_generator, default_generator(device)


def _nondeterministic_op(error: BaseException) -> str | None:
    """The op torch named in a determinism error, or None for any other error. The error may be
    the cause of the one raised: ``torch.distributed.pipelining`` wraps a stage's forward errors."""
    while error is not None:
        head, found, _ = str(error).partition(_TORCH_NONDETERMINISTIC)
        if found and head.strip():
            return head.strip().splitlines()[-1]
        error = error.__cause__
    return None
