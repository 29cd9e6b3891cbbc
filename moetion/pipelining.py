"""Bring your own pipeline: moetion on a ``torch.distributed.pipelining`` stage and schedule.

The user builds the stage and the schedule as usual, with two changes: the stage is a
:class:`LoggedStage` (a ``PipelineStage`` subclass) built with static example arguments, and the
training loop calls the engine :func:`attach` returns instead of ``schedule.step`` and
``optimizer.step``. Each iteration then

1. runs the user's ``schedule.step(...)``: torch does the micro-batches, the sends and receives,
   and (``scale_grads=True``) divides the gradients by the micro-batch count; :class:`LoggedStage`
   runs every forward and backward as a moetion unit of work (``moetion.random`` draws, fault
   points) and puts what it sends (each forward output, each input gradient) into the upstream
   log, whose ``put`` copies it, so torch may reuse its buffers;
2. runs moetion's commit, the same :class:`~moetion.iteration.StageIteration` instructions as
   moetion's own runtime: global grad norm added in stage order, clip, LR, optimizer step, sparse
   capture.

A replay of such a stage runs the same body through the same instructions in the schedule's order
(:class:`~moetion.schedule.StageSchedule`), reading the neighbours' logs, with torch's arithmetic
(loss not scaled, gradients divided after the last backward), so it lands on the same bits.

Supported: ``ScheduleGPipe`` and ``Schedule1F1B`` (one stage per rank), one tensor in and one out
per stage, no data parallelism, no compute copy (config ``precision`` fp32; cast the module to
train it in bf16).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.optim.lr_scheduler import LRScheduler

from moetion import _as_config, _join, failure_notice  # the joining moetion.initialize does
from moetion import log as _log
from moetion.config import Config
from moetion.control import ControlPlane, start_generation
from moetion.data import DataSource, read_micro_batch
from moetion.determinism import Pass, enable_strict_mode
from moetion.distributed import build_context
from moetion.engine import PipelineEngine
from moetion.errors import ConfigError, DataError, MoetionError, PeerFailure
from moetion.initial_state import check_finite, digest
from moetion.module import StagePosition
from moetion.schedule import LossScaling, Order, StageSchedule
from moetion.threads import pin_threads

log = logging.getLogger(__name__)

# The schedules whose order moetion can replay: one stage per rank, backwards in micro-batch order.
SUPPORTED_SCHEDULES: dict[type, Order] = {ScheduleGPipe: Order.FILL_DRAIN, Schedule1F1B: Order.ONE_F_ONE_B}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Schedule = PipelineScheduleSingle | PipelineScheduleMulti


@dataclass(frozen=True)
class Job:
    """This rank's place in a joined job: build the stage with these."""

    config: Config
    stage: int
    num_stages: int
    device: torch.device
    control: ControlPlane | None
    generation: int


def join(config: Config | dict | str | None = None) -> Job:
    """Joins the job (under ``moetion launch``, its supervised group; under ``torchrun``, env://).

    Call first: ``PipelineStage`` needs the process group. One stage per rank, so the pipeline has
    as many stages as the job has ranks.
    """
    config = _as_config(config)
    enable_strict_mode(config.determinism)
    control, generation = _join(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    _log.configure(rank=rank, stage=rank)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Job(config, rank, world, device, control, generation)


class StageModule(StagePosition, nn.Module):
    """The user's stage module as moetion's iteration body sees a stage: no layers of moetion's own,
    no tied weights; ``forward`` is the submodule's, so a replay computes what torch computed."""

    def __init__(self, submod: nn.Module, *, stage_id: int, num_stages: int, loss_fn: LossFn | None) -> None:
        super().__init__()
        self.submod, self.stage_id, self.num_stages, self.loss_fn = submod, stage_id, num_stages, loss_fn
        self.tied = nn.ModuleDict()
        self.ep_size = 1  # experts are not spread over ranks on a torch pipelining stage
        check_finite(self, where=f"stage {stage_id}")  # the initial state is part of exactness, as for PipelineModule
        self.initial_digest = digest(self)

    def tied_stages(self) -> dict[str, list[int]]:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.submod(x)


class LoggedStage(PipelineStage):
    """A ``PipelineStage`` whose boundary tensors moetion logs; use it exactly as ``PipelineStage``.

    ``input_args`` and ``output_args`` (example tensors of one micro-batch; those crossing a stage
    boundary requiring grad, as torch derives the gradients' shapes from them) are required:
    without them torch infers shapes by running the stage once more on the first micro-batch (and,
    on later stages, on uninitialised memory), which changes buffers such as an MoE layer's routing
    counts and breaks bitwise recovery. Until :func:`attach` it behaves as a plain ``PipelineStage``.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device: torch.device, *,
                 input_args: torch.Tensor | None = None, output_args: torch.Tensor | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(input_args, torch.Tensor) or not isinstance(output_args, torch.Tensor):
            raise ConfigError(
                f"stage {stage_index}: pass input_args= and output_args= (one example tensor each, shaped and "
                "typed like one micro-batch's input and output of this stage): without static shapes torch runs "
                "an extra forward and backward in the first step, which changes the module's buffers"
            )
        if stage_index > 0 and not input_args.requires_grad:
            raise ConfigError(
                f"stage {stage_index}: input_args must require grad (input_args.requires_grad_()), or no input "
                "gradient is sent back to the previous stage"
            )
        if stage_index < num_stages - 1 and not output_args.requires_grad:
            raise ConfigError(
                f"stage {stage_index}: output_args must require grad (output_args.requires_grad_()), or torch "
                "receives no gradient of it from the next stage"
            )
        super().__init__(submodule, stage_index, num_stages, device, input_args=input_args, output_args=output_args,
                         group=group)
        self.engine: PipelineEngine | None = None  # set by attach

    def forward_one_chunk(self, fwd_chunk_id: int, args: tuple, kwargs: dict | None = None,
                          save_forward_output: bool = True):
        if self.engine is None:
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        if fwd_chunk_id >= self.engine.config.micro_batches:
            raise ConfigError(f"the schedule runs more micro-batches than micro_batches={self.engine.config.micro_batches}: "
                              "build it with n_microbatches=config.micro_batches")
        with self.engine.micro_batch(fwd_chunk_id, Pass.FORWARD):
            output = super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"stage {self.stage_index} returned {type(output).__name__}; moetion logs one tensor "
                              "per stage boundary")
        if not self.is_last and self.engine.upstream is not None:
            self.engine.upstream.log_activation(self.engine.iteration, fwd_chunk_id, output.detach())
        return output

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, full_backward: bool = True, last_backward: bool = False):
        if self.engine is None:
            return super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        with self.engine.micro_batch(bwd_chunk_id, Pass.BACKWARD):
            super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)
        if not self.is_first and self.engine.upstream is not None:
            grads = self.bwd_cache[bwd_chunk_id]
            if len(grads) != 1 or grads[0] is None:
                raise MoetionError(f"stage {self.stage_index}: the input of micro-batch {bwd_chunk_id} got no "
                                   "gradient; moetion needs one input tensor that reaches the output")
            self.engine.upstream.log_gradient(self.engine.iteration, bwd_chunk_id, grads[0])


def attach(job: Job, stage: LoggedStage, schedule: Schedule, *, optimizer: torch.optim.Optimizer,
           loss_fn: LossFn | None, lr_scheduler: LRScheduler | None = None) -> PipelineEngine:
    """Attaches moetion to a stage and its schedule; returns the engine to train with.

    Call :meth:`PipelineEngine.train_batch` with a :class:`~moetion.data.DataSource` once per
    iteration instead of ``schedule.step`` and ``optimizer.step``; ``loss_fn`` is the one given to
    the schedule (the last stage's, replayed after a failure). Never clip, step or zero the
    optimizer yourself: moetion's commit does it with the pipeline's global grad norm.
    """
    config = job.config
    stage_schedule = _check(job, stage, schedule, optimizer)
    context = build_context(num_stages=job.num_stages, tied_stages={},
                            replication=config.snapshot.enabled and config.snapshot.replicate)
    threads = pin_threads(config.threads, local_world_size=context.local_world_size)
    module = StageModule(stage.submod, stage_id=job.stage, num_stages=job.num_stages, loss_fn=loss_fn)
    runner = _ScheduleRunner(stage, schedule, loss_fn=loss_fn, optimizer=optimizer, micro_batches=config.micro_batches)
    engine = PipelineEngine(module=module, optimizer=optimizer, config=config, dist_context=context, threads=threads,
                            control=job.control, generation=job.generation, replacement=start_generation() > 0,
                            lr_scheduler=lr_scheduler, stage_schedule=stage_schedule, micro_batches=runner)
    stage.engine = engine
    log.info("attached to %s stage %d/%d: %d parameters, %d intra-op threads", type(schedule).__name__, job.stage,
             job.num_stages, sum(p.numel() for p in module.parameters()), threads)
    return engine


def _check(job: Job, stage: PipelineStage, schedule: Schedule, optimizer: torch.optim.Optimizer) -> StageSchedule:
    """The stage schedule to replay with, after refusing what moetion cannot recover exactly."""
    config = job.config
    stage_schedule = stage_schedule_of(schedule)
    if not isinstance(stage, LoggedStage):
        raise ConfigError(f"attach needs a moetion.pipelining.LoggedStage (got {type(stage).__name__}): build the "
                          "stage with it in place of PipelineStage, so that what it sends is logged")
    if stage.stage_index != job.stage or stage.num_stages != job.num_stages:
        raise ConfigError(f"rank {job.stage} of a {job.num_stages}-rank job runs stage {job.stage} of {job.num_stages} "
                          f"(one rank per stage, no data parallelism); the stage was built as {stage.stage_index} of "
                          f"{stage.num_stages}: build it with job.stage and job.num_stages")
    params = list(stage.submod.parameters())
    if not params:
        raise ConfigError(f"stage {stage.stage_index}'s module has no parameters: give every stage at least one "
                          "trainable layer (moetion snapshots and replays parameters)")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if owned != {id(p) for p in params if p.requires_grad}:
        raise ConfigError(f"stage {stage.stage_index}: the optimizer must hold exactly the trainable parameters of "
                          "stage.submod")
    if config.precision != "fp32":
        raise ConfigError(f"precision {config.precision!r}: torch.distributed.pipelining stages train in the "
                          "module's own dtype; moetion supports them under fp32 only")
    return stage_schedule


def stage_schedule_of(schedule: Schedule) -> StageSchedule:
    """The instruction stream a replay of ``schedule``'s stage runs: its order and its gradient scaling."""
    order = SUPPORTED_SCHEDULES.get(type(schedule))
    if order is None:
        raise ConfigError(
            f"{type(schedule).__name__} is not supported: moetion replays ScheduleGPipe and Schedule1F1B (one stage "
            "per rank); interleaved and zero-bubble schedules run several stages per rank or split backward"
        )
    return StageSchedule(order=order, loss_scaling=LossScaling.GRADS if schedule.scale_grads else LossScaling.NONE)


class _ScheduleRunner:
    """Runs the user's schedule over an iteration's micro-batches for the engine.

    After a recovery every rank builds a new schedule of the same class over the same stage: torch
    initialises a schedule in its first step with a vote among all stages, which a replacement's
    fresh schedule would otherwise wait for alone.
    """

    def __init__(self, stage: LoggedStage, schedule: Schedule, *, loss_fn: LossFn | None,
                 optimizer: torch.optim.Optimizer, micro_batches: int) -> None:
        self.stage, self.schedule, self.loss_fn, self.micro_batches = stage, schedule, loss_fn, micro_batches
        self.steps = _StepCounter(optimizer)
        self._generations = 0

    def connected(self) -> None:
        self._generations += 1
        if self._generations > 1:
            self.schedule = type(self.schedule)(self.stage, n_microbatches=self.micro_batches, loss_fn=self.loss_fn,
                                                scale_grads=self.schedule.scale_grads)

    def run(self, iteration: int, data: DataSource) -> list[torch.Tensor]:
        self.steps.check()
        stage = self.stage
        args = (self._batch(iteration, data, 0).to(stage.device),) if stage.is_first else ()
        target = self._batch(iteration, data, 1).to(stage.device) if stage.is_last else None
        losses: list[torch.Tensor] | None = [] if stage.is_last else None
        try:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        except RuntimeError as error:
            if not _lost_peer(error):
                raise
            raise PeerFailure(failure_notice.explain(
                f"stage {stage.stage_index} lost a peer in iteration {iteration} of {type(self.schedule).__name__}: "
                f"{str(error).splitlines()[0]}")) from None
        if losses is not None and len(losses) != self.micro_batches:
            raise ConfigError(f"the schedule ran {len(losses)} micro-batches, the config says micro_batches="
                              f"{self.micro_batches}: build the schedule with n_microbatches=config.micro_batches")
        return losses or []

    def _batch(self, iteration: int, data: DataSource, part: int) -> torch.Tensor:
        """The iteration's inputs (``part`` 0) or labels (1), its micro-batches read by (iteration,
        index) as a replay re-reads them, concatenated for the schedule to split again."""
        pieces = [read_micro_batch(data, iteration, m)[part] for m in range(self.micro_batches)]
        if len({len(x) for x in pieces}) != 1:
            raise DataError(f"iteration {iteration}: micro-batches of unequal size; the schedule splits the batch evenly")
        return torch.cat(pieces)


def _lost_peer(error: RuntimeError) -> bool:
    """A send or receive failed (gloo raises a plain RuntimeError naming its transport); torch wraps
    the model's own errors in its forward and backward with messages of its own."""
    message = str(error)
    return isinstance(error, dist.DistError) or "gloo/transport" in message or "NCCL" in message


class _StepCounter:
    """Catches an optimizer step outside moetion's commit, through torch's public step hook.

    Between two iterations' micro-batches the commit steps once (none when the iteration failed
    before it); more means the training loop steps the optimizer itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.count, self._seen = 0, None
        optimizer.register_step_post_hook(self._stepped)

    def check(self) -> None:
        if self._seen is not None and self.count - self._seen > 1:
            raise ConfigError(
                f"the optimizer stepped {self.count - self._seen} times in one iteration: remove optimizer.step "
                "(and any clipping) from the training loop; moetion's commit clips with the pipeline's global grad "
                "norm and steps once per iteration"
            )
        self._seen = self.count

    def _stepped(self, *_: object) -> None:
        self.count += 1



