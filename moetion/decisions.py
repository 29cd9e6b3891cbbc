"""The global decisions of an iteration: taken live at the commit point, or read back in replay.

Training takes them at the commit point: tied-weight gradients are summed over the stages that
share them, and one all-gather over the pipeline carries every stage's squared grad norm, the
loss and the checkpointer's proposal, from which every rank computes the same global norm (added
in stage order), clip coefficient and loss; the LR factor is a pure function of the iteration.
Every decision is logged. A replaying stage reuses the logged decisions, never recomputing them
from its partial view.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moetion import failure_notice, gradients
from moetion.boundary import Recorder
from moetion.config import LRScheduleConfig
from moetion.errors import PeerFailure
from moetion.expert_parallel import ShardedNorm
from moetion.lr_schedule import lr_factor
from moetion.snapshot.checkpointer import SparseCheckpointer
from moetion.upstream_log import IterationScalars, LogReader


@dataclass(frozen=True)
class CommitRow:
    """One stage's row of the commit all-gather."""

    squared_norm: torch.Tensor  # this stage's sum of squared gradients (tied copies counted once)
    loss_sum: torch.Tensor  # summed over micro-batches and replicas; only the last stage's is a loss
    data_left: torch.Tensor  # 1 unless this stage's data_iter ran out before the next iteration
    riders: torch.Tensor  # the checkpointer's proposal (empty without snapshots)

    def to_tensor(self) -> torch.Tensor:
        return torch.cat([self.squared_norm.reshape(1), self.loss_sum.reshape(1), self.data_left.reshape(1),
                          self.riders.reshape(-1)])

    @classmethod
    def from_tensor(cls, row: torch.Tensor) -> "CommitRow":
        return cls(row[0], row[1], row[2], row[3:])


class LiveDecisions:
    """The :class:`~moetion.iteration.DecisionPort` of a training stage."""

    def __init__(self, *, num_stages: int, pipeline_group: dist.ProcessGroup | None,
                 tied_groups: dict[str, dist.ProcessGroup], norm_params: list[nn.Parameter],
                 grad_clip: float | None, lr_schedule: LRScheduleConfig, loss_divisor: int,
                 checkpointer: SparseCheckpointer | None, log: Recorder | None, device: torch.device,
                 where: str, sharded_norm: ShardedNorm | None = None) -> None:
        self.num_stages, self.pipeline_group, self.tied_groups = num_stages, pipeline_group, tied_groups
        self.norm_params, self.grad_clip, self.lr_schedule = norm_params, grad_clip, lr_schedule
        self.loss_divisor = loss_divisor  # micro-batches x replicas
        self.checkpointer, self.log, self.device, self.where = checkpointer, log, device, where
        self.data_ended = False  # a reading stage's data_iter holds no iteration after the last decided
        self.sharded_norm = sharded_norm  # experts spread over an expert-parallel group

    def reduce_tied(self, iteration: int, key: str, params: list[nn.Parameter]) -> None:
        for p in params:
            _collective(dist.all_reduce, p.grad, group=self.tied_groups[key],
                        what=f"summing tied weight {key!r} in iteration {iteration} ({self.where})")
        if self.log is not None:
            self.log.log_tied_grads(iteration, key, [p.grad for p in params])

    def decide(self, iteration: int, *, loss_sum: torch.Tensor, data_left: bool = True) -> IterationScalars:
        riders = (self.checkpointer.stage_payload() if self.checkpointer is not None
                  else torch.zeros(0, dtype=torch.float32))
        square = (gradients.squared_norm(self.norm_params, device=self.device) if self.sharded_norm is None
                  else self.sharded_norm.squared(self.norm_params, device=self.device))
        mine = CommitRow(square, loss_sum, torch.tensor(float(data_left), device=self.device),
                         riders.to(self.device)).to_tensor()
        gathered = [torch.empty_like(mine) for _ in range(self.num_stages)]
        _collective(dist.all_gather, gathered, mine, group=self.pipeline_group,
                    what=f"exchanging grad norms in iteration {iteration} ({self.where})")
        rows = [CommitRow.from_tensor(row) for row in gathered]
        self.data_ended = any(float(row.data_left) == 0.0 for row in rows)
        norm = gradients.total_norm([row.squared_norm for row in rows])
        scalars = IterationScalars(lr_factor=lr_factor(self.lr_schedule, iteration), grad_norm=float(norm),
                                   clip_coef=gradients.clip_coefficient(norm, self.grad_clip),
                                   loss=float(rows[-1].loss_sum) / self.loss_divisor)
        if self.log is not None:
            self.log.log_scalars(iteration, scalars)
        if self.checkpointer is not None:
            self.checkpointer.absorb_gather([row.riders.cpu() for row in rows])
        return scalars


class LoggedDecisions:
    """The :class:`~moetion.iteration.DecisionPort` of a replaying stage: the logged decisions,
    recorded again into ``record`` so that the replayed stage can serve its neighbours later."""

    def __init__(self, logs: LogReader, record: Recorder | None = None) -> None:
        self.logs, self.record = logs, record

    def reduce_tied(self, iteration: int, key: str, params: list[nn.Parameter]) -> None:
        reduced = [self.logs.tied_grad(iteration, key, index) for index in range(len(params))]
        for param, grad in zip(params, reduced):
            if param.requires_grad:
                param.grad = grad.to(param.grad.dtype)
        if self.record is not None:
            self.record.log_tied_grads(iteration, key, reduced)

    def decide(self, iteration: int, *, loss_sum: torch.Tensor, data_left: bool = True) -> IterationScalars:
        scalars = self.logs.scalars(iteration)
        if self.record is not None:
            self.record.log_scalars(iteration, scalars)
        return scalars


def _collective(op, *args: object, group: dist.ProcessGroup | None, what: str) -> None:
    try:
        op(*args, group=group)
    except RuntimeError as error:
        raise PeerFailure(failure_notice.explain(f"lost a peer while {what}: {str(error).splitlines()[0]}")) from None
