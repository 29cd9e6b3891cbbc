"""One iteration on one stage: the body that training and replay both run.

Bitwise recovery rests on replay doing exactly what training did, so the arithmetic of an
iteration lives here once: the 1F1B instruction stream in schedule order, the global micro-batch
index, the unit of work (step context and forked torch generators) of every forward and backward, loss scaling by ``1/M``, the gradient fill, the tied and
data-parallel reductions, clipping, the learning rate and the optimizer step.

The body talks to the world only through small ports:

- :class:`InputPort`: where a micro-batch's input activation and output gradient come from (live
  links from the neighbours while training; the neighbours' logs, or a chain member's live link,
  in replay);
- :class:`OutputPort`: where what the stage computes goes (the links, teed into the upstream log;
  in replay, the replacement's own log);
- :class:`DecisionPort`: the iteration's global decisions (tied-weight gradient sums, grad norm,
  clip coefficient, LR factor, loss): the commit all-gather while training, the logged decisions
  in replay;
- :class:`StepHooks`: what happens around the optimizer step (sparse capture while training, the
  promotion of frozen operators in replay) and what rides on the data-parallel all-reduce.

The instruction stream is a :class:`~moetion.schedule.StageSchedule`: moetion's 1F1B by default, or
the order and loss scaling of a ``torch.distributed.pipelining`` schedule. When such a schedule runs
an iteration's micro-batches itself, :meth:`StageIteration.run_external` runs the rest of the
iteration (the commit) here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from moetion import expert_parallel, failure_notice, gradients, schedule
from moetion.config import Config
from moetion.data import DataSource, read_micro_batch
from moetion.data_iter import IteratorSource
from moetion.determinism import Pass, unit_of_work
from moetion.errors import PeerFailure
from moetion.lr_schedule import set_lr_factor
from moetion.lr_scheduler import step_lr_scheduler
from moetion.model_state import CommittedState
from moetion.module import PipelineModule
from moetion.moe import MoELayer
from moetion.routing import TokenCounts
from moetion.precision import StagePrecision
from moetion.random import StepContext
from moetion.upstream_log import IterationScalars


class InputPort(Protocol):
    """Where a stage's inputs from its neighbours come from."""

    def activation(self, iteration: int, micro_batch: int) -> torch.Tensor: ...
    def gradient(self, iteration: int, micro_batch: int, like: torch.Tensor) -> torch.Tensor: ...


class OutputPort(Protocol):
    """Where what a stage sends to its neighbours goes."""

    def send_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None: ...
    def send_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None: ...
    def wait_sends(self) -> None: ...


class DecisionPort(Protocol):
    """The iteration's decisions that no stage can take from its own view."""

    def reduce_tied(self, iteration: int, key: str, params: list[nn.Parameter]) -> None:
        """Leaves in each ``p.grad`` the sum over every stage sharing the tied weight ``key``."""

    def decide(self, iteration: int, *, loss_sum: torch.Tensor, data_left: bool = True) -> IterationScalars:
        """The global grad norm, clip coefficient, LR factor and loss of ``iteration``; ``data_left``
        says whether this stage's data_iter holds the next iteration."""


class StepHooks:
    """What happens around an iteration besides its arithmetic; the defaults do nothing."""

    def begin(self, iteration: int) -> None:
        """Before the first instruction."""

    def riders(self, token_counts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Values summed across data-parallel replicas together with the gradients."""
        return None

    def absorb_riders(self, summed: torch.Tensor) -> None:
        """The riders summed over the replicas."""

    def before_step(self) -> None:
        """After the decisions, before the optimizer writes the weights."""

    def after_step(self, iteration: int) -> None:
        """After the optimizer step and the compute-copy refresh."""


def no_fault(phase: str, iteration: int) -> None:
    """The fault hook of a stage with no fault armed."""


@dataclass
class IterationStats:
    """What one iteration produced; ``loss`` is the mean over micro-batches and replicas."""

    iteration: int
    loss: float
    grad_norm: float
    clip_coef: float
    lr_factor: float
    seconds: float


@dataclass
class _InFlight:
    """Tensors alive between a micro-batch's instructions, keyed by micro-batch index."""

    loss_sum: torch.Tensor
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    labels: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    input_grads: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    """Where the stage sits: its replica index among ``replicas`` and the group that averages them;
    under expert parallelism also the group its MoE layers exchange tokens with and the group that
    averages its experts' gradients (None when it holds the only copy of them)."""

    replica: int = 0
    replicas: int = 1
    data_group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")
    expert_group: dist.ProcessGroup | None = None
    expert_data_group: dist.ProcessGroup | None = None


class StageIteration:
    """Runs iterations of one stage through its ports; construct once, call :meth:`run` per iteration.

    ``faults(phase, iteration)`` is called at the phases a fault may be injected at
    (``"iteration"``, ``"forward"``, ``"backward"``, ``"step"``). A user's ``lr_scheduler`` replaces
    the LR factor: it steps once after each optimizer step, with the iteration's decided loss.
    """

    def __init__(
        self,
        *,
        module: PipelineModule,
        precision: StagePrecision,
        optimizer: torch.optim.Optimizer,
        config: Config,
        placement: Placement,
        inputs: InputPort,
        outputs: OutputPort,
        decisions: DecisionPort,
        hooks: StepHooks | None = None,
        faults: Callable[[str, int], None] = no_fault,
        lr_scheduler: LRScheduler | None = None,
        stage_schedule: schedule.StageSchedule = schedule.StageSchedule(),
    ) -> None:
        self.module, self.precision, self.optimizer = module, precision, optimizer
        self.stage_schedule = stage_schedule
        self.lr_scheduler = lr_scheduler
        self.config, self.micro_batches, self.placement = config, config.micro_batches, placement
        self.inputs, self.outputs, self.decisions = inputs, outputs, decisions
        self.hooks = hooks or StepHooks()
        self.faults = faults
        self.token_counts: dict[str, torch.Tensor] = {}
        self._routing = TokenCounts(precision.compute)  # forwards run on the compute copy: it counts
        self._moe_layers = [m for m in precision.compute.modules() if isinstance(m, MoELayer)]
        # Experts held by this rank alone among its expert-parallel group: averaged over expert-DP only.
        self._sharded = {id(p) for m in module.modules() if isinstance(m, MoELayer) and m.shard.size > 1
                         for p in m.experts.parameters()}
        self._master_moe = [m for m in module.modules() if isinstance(m, MoELayer)]  # the compute layers' masters
        self.committed = CommittedState(module)  # buffers and frozen parameters, to undo an abandoned iteration
        self._iteration = -1
        self._data: DataSource | None = None
        self._mb: _InFlight | None = None
        self._stats: IterationStats | None = None

    def run(self, iteration: int, data: DataSource) -> IterationStats:
        """Runs ``iteration`` to its commit; raises :class:`PeerFailure` if a port loses a peer."""
        start = self._begin(iteration, data)
        with expert_parallel.expert_group(self.placement.expert_group):
            for instruction in self.stage_schedule.instructions(
                stage=self.module.stage_id, num_stages=self.module.num_stages, micro_batches=self.micro_batches
            ):
                _DISPATCH[type(instruction)](self, instruction.micro_batch)
        return self._end(start)

    def run_external(self, iteration: int, data: DataSource,
                     micro_batches: Callable[[], list[torch.Tensor]]) -> IterationStats:
        """Runs ``iteration`` whose micro-batch instructions an outside schedule executes.

        ``micro_batches()`` runs every forward, backward and send of the iteration (each inside
        :meth:`unit_of_work`, gradients scaled as ``stage_schedule`` says) and returns the
        micro-batch losses in micro-batch order (none except on the last stage); the commit
        instructions then run here exactly as in :meth:`run`.
        """
        start = self._begin(iteration, data)
        for loss in micro_batches():
            self._add_loss(loss)
        for instruction in schedule.commit_instructions():
            _DISPATCH[type(instruction)](self, instruction.micro_batch)
        return self._end(start)

    def unit_of_work(self, m: int, pass_: Pass) -> ContextManager[StepContext]:
        """The unit of work of micro-batch ``m`` of the running iteration (its generators, its step context)."""
        return unit_of_work(self.config, stage=self.module.stage_id, iteration=self._iteration,
                            micro_batch=self.global_index(m), pass_=pass_, device=self.placement.device)

    def _begin(self, iteration: int, data: DataSource) -> float:
        start = time.perf_counter()
        self._iteration, self._data = iteration, data
        self._mb = _InFlight(loss_sum=torch.zeros((), dtype=torch.float32, device=self.placement.device))
        self.committed.commit()
        self.optimizer.zero_grad(set_to_none=True)
        self.faults("iteration", iteration)
        self.hooks.begin(iteration)
        for layer in self._moe_layers:
            layer.begin_iteration()
        return start

    def _end(self, start: float) -> IterationStats:
        stats, self._stats, self._mb = self._stats, None, None
        stats.seconds = time.perf_counter() - start
        return stats

    def abandon(self) -> None:
        """Forgets an interrupted iteration's gradients and routing counts and puts back the buffers
        (and frozen parameters) its forwards changed; weights are untouched."""
        self._mb = None
        self.committed.rollback()
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.discard_grads()
        for layer in self._moe_layers:
            layer.discard_source_grads()
        self._routing.pop(note=False)

    def trainable(self) -> list[nn.Parameter]:
        """The master parameters that train this iteration (frozen operators of a replay do not)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def global_index(self, m: int) -> int:
        """Micro-batch ``m`` of this replica, numbered across replicas: replica ``r`` owns ``r*M .. r*M+M-1``."""
        return self.placement.replica * self.micro_batches + m

    # -- micro-batch instructions ------------------------------------------------------------------
    def _load_micro_batch(self, m: int | None) -> None:
        inputs, labels = read_micro_batch(self._data, self._iteration, self.global_index(m))
        device = self.placement.device
        if self.module.is_first_stage:
            self._mb.inputs[m] = inputs.to(device)
        if self.module.is_last_stage:
            self._mb.labels[m] = labels.to(device)

    def _recv_activation(self, m: int | None) -> None:
        x = self.inputs.activation(self._iteration, m)
        self._mb.inputs[m] = x.requires_grad_(x.is_floating_point())

    def _forward(self, m: int | None) -> None:
        self.faults("forward", self._iteration)
        with self.unit_of_work(m, Pass.FORWARD):
            out = self.precision.compute(self._mb.inputs[m])
            if self.module.is_last_stage:
                loss = self.module.loss_fn(out, self._mb.labels.pop(m))
                self._add_loss(loss)
                out = loss / self.micro_batches if self.stage_schedule.loss_scaling is schedule.LossScaling.LOSS else loss
        self._mb.outputs[m] = out

    def _add_loss(self, loss: torch.Tensor) -> None:
        self._mb.loss_sum += loss.detach().float()

    def _send_activation(self, m: int | None) -> None:
        self.outputs.send_activation(self._iteration, m, self._mb.outputs[m].detach())

    def _recv_grad(self, m: int | None) -> None:
        self._mb.output_grads[m] = self.inputs.gradient(self._iteration, m, like=self._mb.outputs[m])

    def _backward(self, m: int | None) -> None:
        self.faults("backward", self._iteration)
        out = self._mb.outputs.pop(m)
        if out.requires_grad:  # a stage whose every operator is frozen has nothing to differentiate
            with self.unit_of_work(m, Pass.BACKWARD):
                torch.autograd.backward(out, grad_tensors=self._mb.output_grads.pop(m, None))
        self.precision.after_backward()
        for layer in self._moe_layers:
            layer.after_backward()
        x = self._mb.inputs.pop(m)
        if not self.module.is_first_stage:
            self._mb.input_grads[m] = x.grad if x.grad is not None else torch.zeros_like(x)

    def _divide_grads(self, _: int | None) -> None:
        """The mean over micro-batches taken after backward (``LossScaling.GRADS``), as
        ``torch.distributed.pipelining`` takes it: each gradient divided in place by ``M``."""
        for p in self.precision.compute.parameters():
            if p.grad is not None:
                p.grad.div_(self.micro_batches)

    def _send_grad(self, m: int | None) -> None:
        self.outputs.send_gradient(self._iteration, m, self._mb.input_grads.pop(m))

    def _wait_sends(self, _: int | None) -> None:
        self.outputs.wait_sends()

    # -- per-iteration instructions -----------------------------------------------------------------
    def _reduce_tied_grads(self, _: int | None) -> None:
        for layer, master in zip(self._moe_layers, self._master_moe):
            layer.fold_source_grads(master)
        gradients.fill_missing_grads(self.trainable())
        for key in self.module.tied_stages():
            if key in self.module.tied:
                self.decisions.reduce_tied(self._iteration, key, list(self.module.tied[key].parameters()))

    def _reduce_grads(self, _: int | None) -> None:
        """Averages gradients across replicas; the loss and the hooks' riders ride along.

        A sharded expert's gradient is summed only over the replicas holding that expert (its
        expert-parallel group already summed its sources), and divided by all replicas as well."""
        self.token_counts = self._routing.pop()
        riders = self.hooks.riders(self.token_counts)
        extra = [self._mb.loss_sum.reshape(1)] + ([] if riders is None else [riders.to(self.placement.device)])
        if self.placement.replicas > 1:
            replicated = [p for p in self.trainable() if id(p) not in self._sharded]
            rest = self._average(replicated, extra, self.placement.data_group)
            extra = [rest[:1], rest[1:]]
            experts = [p for p in self.trainable() if id(p) in self._sharded]
            if experts:
                self._average(experts, [], self.placement.expert_data_group)
        self._mb.loss_sum = extra[0][0]
        if riders is not None:
            self.hooks.absorb_riders(extra[1].cpu())

    def _average(self, params: list[nn.Parameter], extra: list[torch.Tensor],
                 group: dist.ProcessGroup | None) -> torch.Tensor:
        """Sums ``params``' gradients (then ``extra``) over ``group`` (None: this rank alone), divides
        them by the replicas; returns the summed extras."""
        flat = gradients.flatten_grads(params, extra)
        if group is not None:
            try:
                dist.all_reduce(flat, group=group)
            except RuntimeError as error:
                raise PeerFailure(failure_notice.explain(
                    f"stage {self.module.stage_id} lost a replica while averaging gradients in "
                    f"iteration {self._iteration}: {str(error).splitlines()[0]}")) from None
        return gradients.unflatten_mean(params, flat, replicas=self.placement.replicas)

    def _optimizer_step(self, _: int | None) -> None:
        """The commit: global decisions, clip, LR, step, refresh the compute copy."""
        scalars = self.decisions.decide(self._iteration, loss_sum=self._mb.loss_sum, data_left=self._read_ahead())
        params = self.trainable()
        gradients.scale_grads(params, scalars.clip_coef)
        if self.lr_scheduler is None:
            set_lr_factor(self.optimizer, scalars.lr_factor)
        self.hooks.before_step()
        self.faults("step", self._iteration)
        self.optimizer.step()
        self.precision.after_step()
        if self.lr_scheduler is not None:  # before the hooks: a window's first capture sees the stepped state
            step_lr_scheduler(self.lr_scheduler, scalars.loss)
        self.hooks.after_step(self._iteration)
        self._stats = IterationStats(self._iteration, scalars.loss, scalars.grad_norm, scalars.clip_coef,
                                     scalars.lr_factor, 0.0)

    def _read_ahead(self) -> bool:
        """A reading stage's data_iter pulls the next iteration now, so the commit can tell every
        rank whether there is one (see :mod:`moetion.data_iter`); replay reads ahead the same way."""
        if not isinstance(self._data, IteratorSource) or not (self.module.is_first_stage or self.module.is_last_stage):
            return True
        return self._data.read_ahead(self._iteration + 1, [self.global_index(m) for m in range(self.micro_batches)])


# Instruction type -> handler. Kept on the class, not the instance: a bound-method table would make
# every body a reference cycle, and a body dropped on leaving a group must free its links (their
# pending sends hold the old group's sockets open) at once, not at the next garbage collection.
_DISPATCH: dict[type[schedule.Instruction], Callable[[StageIteration, int | None], None]] = {
    schedule.LoadMicroBatch: StageIteration._load_micro_batch,
    schedule.RecvActivation: StageIteration._recv_activation,
    schedule.ForwardPass: StageIteration._forward,
    schedule.SendActivation: StageIteration._send_activation,
    schedule.RecvGrad: StageIteration._recv_grad,
    schedule.BackwardPass: StageIteration._backward,
    schedule.DivideGrads: StageIteration._divide_grads,
    schedule.SendGrad: StageIteration._send_grad,
    schedule.WaitSends: StageIteration._wait_sends,
    schedule.ReduceTiedGrads: StageIteration._reduce_tied_grads,
    schedule.ReduceGrads: StageIteration._reduce_grads,
    schedule.OptimizerStep: StageIteration._optimizer_step,
}
