"""Single-process training of a PipelineModule's layers: the ground truth a pipeline must equal.

It builds every stage's module in one process, runs each micro-batch end to end through all of
them, and reproduces the pipeline's reduction *structure* (gradients accumulated per replica in
micro-batch order, tied copies summed in stage order, replicas summed in rank order, per-stage
squared norms added in stage order), because floating-point sums are only bitwise equal when they
are associated the same way. Each stage's forward and backward of a micro-batch is a unit of work
of its own (:func:`~moetion.determinism.unit_of_work`), as on a pipeline stage, so the autograd
graph is cut at stage boundaries and the backward runs stage by stage, last to first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from moetion import gradients
from moetion.config import Config
from moetion.data import DataSource
from moetion.initial_state import check_initial
from moetion.lr_schedule import lr_factor, set_lr_factor
from moetion.lr_scheduler import build_lr_scheduler, step_lr_scheduler
from moetion.module import LayerSpec, PipelineModule
from moetion.precision import StagePrecision
from moetion.determinism import Pass, enable_strict_mode, unit_of_work

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class ReferenceRun:
    losses: list[float]
    stages: list[PipelineModule]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[LRScheduler | None]


def train_reference(
    *,
    layers: Sequence[LayerSpec | nn.Module],
    num_stages: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: OptimizerFactory,
    config: Config,
    data: DataSource,
    iterations: int,
    data_parallel: int = 1,
    partition_method: str = "parameters",
    module_seed: int = 0,
    lr_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
    initial_digests: Sequence[Mapping[str, int]] | None = None,
) -> ReferenceRun:
    """Trains ``iterations`` steps in this process; run it with the pipeline's thread count.

    ``lr_scheduler`` builds each stage's scheduler from its optimizer, as the pipeline's factory does.
    ``initial_digests`` (each pipeline stage's ``module.initial_digest``, by stage) checks that the
    reference starts from the bits the pipeline started from."""
    stages = [
        PipelineModule(layers, num_stages, loss_fn=loss_fn, partition_method=partition_method, stage_id=s, seed=module_seed)
        for s in range(num_stages)
    ]
    for stage, expected in zip(stages, initial_digests or ()):
        check_initial(stage, stage.initial_digest, expected, where=f"the reference's stage {stage.stage_id}")
    enable_strict_mode(config.determinism)
    optimizers = [optimizer(stage.parameters()) for stage in stages]
    schedulers = [build_lr_scheduler(lr_scheduler, opt, config.lr_schedule) for opt in optimizers]
    precisions = [StagePrecision(stage, config.precision) for stage in stages]
    params = [[p for p in stage.parameters() if p.requires_grad] for stage in stages]
    tied = stages[0].tied_stages()
    norm_params = [_counted_in_norm(stage, tied) for stage in stages]
    micro = config.micro_batches
    losses = []
    for iteration in range(iterations):
        replica_grads, loss_sum = [], torch.zeros((), dtype=torch.float32)
        for replica in range(data_parallel):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            replica_loss = torch.zeros((), dtype=torch.float32)
            for m in range(micro):
                index = replica * micro + m
                inputs, labels = data.micro_batch(iteration, index)
                unit = dict(iteration=iteration, micro_batch=index)
                x, boundaries = inputs, []  # each stage's (input, output), cut from the previous stage
                for s, precision in enumerate(precisions):
                    with unit_of_work(config, stage=s, pass_=Pass.FORWARD, **unit):
                        out = precision.compute(x)
                        if s == num_stages - 1:
                            loss = loss_fn(out, labels)
                            out = loss / micro
                    boundaries.append((x, out))
                    x = out.detach().requires_grad_(out.is_floating_point())
                replica_loss += loss.detach().float()
                grad = None
                for s in reversed(range(num_stages)):
                    x, out = boundaries[s]
                    if out.requires_grad:
                        with unit_of_work(config, stage=s, pass_=Pass.BACKWARD, **unit):
                            torch.autograd.backward(out, grad_tensors=grad)
                    grad = x.grad if x.grad is not None else torch.zeros_like(x)
                for precision in precisions:
                    precision.after_backward()
            for stage_params in params:
                gradients.fill_missing_grads(stage_params)
            _sum_tied(stages, tied)
            replica_grads.append([[p.grad.clone() for p in stage_params] for stage_params in params])
            loss_sum = loss_sum + replica_loss if replica else replica_loss
        if data_parallel > 1:
            for s, stage_params in enumerate(params):
                for i, p in enumerate(stage_params):
                    total = replica_grads[0][s][i]
                    for r in range(1, data_parallel):
                        total = total + replica_grads[r][s][i]
                    p.grad = total.div_(data_parallel)
        norm = gradients.total_norm([gradients.squared_norm(ps) for ps in norm_params])
        coef = gradients.clip_coefficient(norm, config.grad_clip)
        losses.append(float(loss_sum) / (micro * data_parallel))
        for s, opt in enumerate(optimizers):
            gradients.scale_grads(params[s], coef)
            if schedulers[s] is None:
                set_lr_factor(opt, lr_factor(config.lr_schedule, iteration))
            opt.step()
            precisions[s].after_step()
            if schedulers[s] is not None:
                step_lr_scheduler(schedulers[s], losses[-1])
    return ReferenceRun(losses=losses, stages=stages, optimizers=optimizers, schedulers=schedulers)


def _sum_tied(stages: list[PipelineModule], tied: dict[str, list[int]]) -> None:
    for key, holders in tied.items():
        copies = [list(stages[s].tied[key].parameters()) for s in holders]
        for group in zip(*copies):
            total = group[0].grad
            for p in group[1:]:
                total = total + p.grad
            for p in group:
                p.grad = total.clone()


def _counted_in_norm(stage: PipelineModule, tied: dict[str, list[int]]) -> list[nn.Parameter]:
    skip = {
        id(p)
        for key in tied
        if key in stage.tied and stage.tied_parameter_owner(key) != stage.stage_id
        for p in stage.tied[key].parameters()
    }
    return [p for p in stage.parameters() if p.requires_grad and id(p) not in skip]
