"""Sparse-to-dense conversion: rebuild a stage's exact state ``S_f`` from its last complete window
plus what its neighbours logged (DESIGN.md §2.2).

The window starting at ``t0`` holds, after each step ``t0 + i``, the full snapshot of slot ``i``
and the compute snapshot of every later slot. Replay starts from capture 0 (slot 0 full, everything
else frozen at its compute weights), then for ``t = t0+1 .. f``:

1. frozen operators (slots ``>= j``, ``j = t - t0``) run forward and pass input-gradients back but
   have ``requires_grad`` off: no weight gradient, no optimizer step (any parameter type);
2. the iteration runs over micro-batches in order, reading inputs and output-gradients from the
   neighbours' logs (the first and last stage re-read inputs and labels from the data source), with
   the same random draws, the logged clip coefficient and learning-rate factor, and the logged
   reduced gradient of tied weights;
3. slot ``j`` is promoted by loading its full snapshot of step ``t`` and the still-frozen slots get
   their compute weights of step ``t``.
After ``t0 + W - 1`` every operator is active and the remaining iterations are ordinary steps.

Data parallelism: the replica group replays together. Each replica replays its own micro-batches
from its own neighbours' logs, and before every step the active gradients are averaged across the
group exactly as in training (replicas are bit-identical, so any replica's window serves them all).
Logging the reduced gradients instead would cost a full gradient per iteration.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
from logging_store import LogStore
from torch import nn

from moetion import gradients
from moetion.config import Config
from moetion.data import DataSource
from moetion.errors import MoetionError
from moetion.faults import fault_point
from moetion.module import LayerSpec, PipelineModule
from moetion.operators import discover_operators
from moetion.precision import StagePrecision
from moetion.determinism import Pass, unit_of_work
from moetion.snapshot.image import WindowImage
from moetion.snapshot.persist import list_persisted, load_persisted, load_window_logs, window_path
from moetion.upstream_log import IterationScalars, LogReader

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Receives what a replaying stage would have sent and decided (an :class:`UpstreamLog` does)."""

    def log_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None: ...
    def log_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None: ...
    def log_tied_grads(self, iteration: int, key: str, grads: Iterable[torch.Tensor]) -> None: ...
    def log_scalars(self, iteration: int, scalars: IterationScalars) -> None: ...


@dataclass
class ReplayReport:
    start_iteration: int
    until: int
    iterations_replayed: int
    seconds: float


def replay_stage(
    *,
    module: PipelineModule,
    optimizer: torch.optim.Optimizer,
    config: Config,
    window: WindowImage | None,
    logs: LogReader,
    data: DataSource,
    until: int,
    precision: StagePrecision | None = None,
    replica_group: dist.ProcessGroup | None = None,
    record: Recorder | None = None,
) -> ReplayReport:
    """Brings ``module`` and ``optimizer`` (freshly built for the window's stage) to ``S_until``.

    ``until`` must lie at or past the window's last iteration. ``window=None`` replays from the
    freshly initialised module, iterations ``0..until`` (a failure before any window completed).
    ``precision`` is the stage's compute copy when the caller keeps one (the engine does);
    otherwise one is made here. A stage trained with data parallelism replays with every replica at
    once: call this on each, passing the group of replaying replicas (its size must equal the
    training's) and each replica's own ``logs``. ``record`` receives what the stage would have sent
    and the iteration's decisions, so a replacement can serve its own neighbours' replays later.
    """
    precision = precision or StagePrecision(module, config.precision)
    if window is None:
        return _replay_from_initial(module, optimizer, config, logs, data, until, precision, record)
    manifest = window.manifest
    replicas = manifest.extra.get("data_parallel", 1)
    group_size = 1 if replica_group is None else dist.get_world_size(replica_group)
    if replicas != group_size:
        raise MoetionError(
            f"stage {manifest.stage} trained with {replicas} data-parallel replica(s) but {group_size} replay: "
            "gradients were averaged across the replicas, so they must replay together (pass replica_group), "
            "or copy the state of a live replica instead"
        )
    if manifest.stage != module.stage_id:
        raise MoetionError(f"window of stage {manifest.stage} cannot rebuild stage {module.stage_id}")
    if manifest.precision != config.precision:
        raise MoetionError(f"the window was captured under {manifest.precision}, the config says {config.precision}")
    if until < manifest.end_iteration:
        raise MoetionError(
            f"replay must reach at least iteration {manifest.end_iteration}, the window's last, to yield a "
            f"consistent state; asked for {until}"
        )
    if torch.get_num_threads() != manifest.threads:
        log.info("replay uses %d intra-op threads as the original run did (was %d)", manifest.threads, torch.get_num_threads())
        torch.set_num_threads(manifest.threads)
    start = time.perf_counter()
    state = _StageState(module, precision, optimizer, window)
    state.load(0)
    for t in range(manifest.start_iteration + 1, until + 1):
        fault_point("replay", stage=manifest.stage, replica=manifest.replica, iteration=t)
        _replay_iteration(state, config=config, logs=logs, data=data, iteration=t, replica_group=replica_group,
                          record=record)
        j = t - manifest.start_iteration
        if j < manifest.window:
            state.load(j)
    state.set_trainable(len(manifest.slots))
    seconds = time.perf_counter() - start
    log.info("replayed stage %d from iteration %d to %d in %.2f s", module.stage_id, manifest.start_iteration, until, seconds)
    return ReplayReport(manifest.start_iteration, until, until - manifest.start_iteration, seconds)


def _replay_from_initial(module: PipelineModule, optimizer: torch.optim.Optimizer, config: Config, logs: LogReader,
                         data: DataSource, until: int, precision: StagePrecision,
                         record: Recorder | None) -> ReplayReport:
    """Ordinary steps ``0..until`` from the module as built: its weights depend only on the seed."""
    start = time.perf_counter()
    state = _StageState(module, precision, optimizer, None)
    for t in range(0, until + 1):
        fault_point("replay", stage=module.stage_id, replica=0, iteration=t)
        _replay_iteration(state, config=config, logs=logs, data=data, iteration=t, replica_group=None, record=record)
    seconds = time.perf_counter() - start
    return ReplayReport(-1, until, until + 1, seconds)


class _StageState:
    """The stage's parameters by operator, and loading a capture's snapshots into them."""

    def __init__(self, module: PipelineModule, precision: StagePrecision, optimizer: torch.optim.Optimizer,
                 window: WindowImage | None) -> None:
        self.module, self.precision, self.optimizer, self.window = module, precision, optimizer, window
        self.masters = dict(module.named_parameters())
        self.computes = dict(precision.compute.named_parameters())
        self.active_slots = 1
        if window is None:  # the initial state: one slot, every operator active
            self.slot_params = [[n for n, p in module.named_parameters() if p.requires_grad]]
            return
        operators = {op.name: op for op in discover_operators(module)}
        slotted = {op for slot in window.manifest.slots for op in slot}
        if slotted != set(operators):
            raise MoetionError(
                f"the window's operators do not match the model: only in the window {sorted(slotted - set(operators))}, "
                f"only in the model {sorted(set(operators) - slotted)}"
            )
        self.slot_params = [[n for op in slot for n in operators[op].param_names] for slot in window.manifest.slots]

    def load(self, j: int) -> None:
        """After step t0+j: slot j becomes active from its full snapshot; later slots get compute weights."""
        capture = self.window.manifest.captures[j]
        promoted = set(self.slot_params[j])
        with torch.no_grad():
            for entry in capture.entries:
                value = self.window.tensor(entry)
                if entry.role == "weight":
                    self.masters[entry.param].copy_(value)
                elif entry.role.startswith("optim."):
                    self.optimizer.state[self.masters[entry.param]][entry.role[len("optim."):]] = value
                elif entry.role == "compute":
                    self.computes[entry.param].copy_(value)
            if self.precision.compute is not self.module:
                for name in promoted:
                    self.computes[name].copy_(self.masters[name])
        self.set_trainable(j + 1)

    def set_trainable(self, active_slots: int) -> None:
        """Slots below ``active_slots`` train; the rest are frozen (forward and input-gradients only)."""
        self.active_slots = active_slots
        for i, names in enumerate(self.slot_params):
            for name in names:
                self.masters[name].requires_grad_(i < active_slots)
                self.computes[name].requires_grad_(i < active_slots)

    def active_params(self) -> list[nn.Parameter]:
        return [self.masters[n] for names in self.slot_params[: self.active_slots] for n in names]

    def refresh_active_compute(self) -> None:
        if self.precision.compute is self.module:
            return
        with torch.no_grad():
            for names in self.slot_params[: self.active_slots]:
                for name in names:
                    self.computes[name].copy_(self.masters[name])


def _replay_iteration(state: _StageState, *, config: Config, logs: LogReader, data: DataSource, iteration: int,
                      replica_group: dist.ProcessGroup | None, record: Recorder | None = None) -> None:
    module, micro = state.module, config.micro_batches
    replica = 0 if replica_group is None else dist.get_rank(replica_group)
    state.optimizer.zero_grad(set_to_none=True)
    for m in range(micro):
        index = replica * micro + m  # the global micro-batch index, as in training
        inputs, labels = data.micro_batch(iteration, index) if (module.is_first_stage or module.is_last_stage) else (None, None)
        x = inputs if module.is_first_stage else logs.activation(iteration, m)
        if not module.is_first_stage:
            x.requires_grad_(x.is_floating_point())
        unit = dict(stage=module.stage_id, iteration=iteration, micro_batch=index, device=x.device)
        with unit_of_work(config, pass_=Pass.FORWARD, **unit):
            out = state.precision.compute(x)
            if module.is_last_stage:
                out = module.loss_fn(out, labels) / micro
        grad = None
        if not module.is_last_stage:
            if record is not None:  # first: a stage replaying beside this one waits for it
                record.log_activation(iteration, m, out.detach())
            grad = logs.gradient(iteration, m, like=out)
        if out.requires_grad:
            with unit_of_work(config, pass_=Pass.BACKWARD, **unit):
                torch.autograd.backward(out, grad_tensors=grad)
        state.precision.after_backward()
        if record is not None and not module.is_first_stage:
            record.log_gradient(iteration, m, x.grad if x.grad is not None else torch.zeros_like(x))
    active = state.active_params()
    gradients.fill_missing_grads(active)
    _use_logged_tied_grads(state, logs, iteration, record)
    if replica_group is not None:
        _average_across_replicas(active, replica_group)
    scalars = logs.scalars(iteration)
    if record is not None:
        record.log_scalars(iteration, scalars)
    gradients.scale_grads(active, scalars.clip_coef)
    for group in state.optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * scalars.lr_factor
    state.optimizer.step()
    state.refresh_active_compute()


def _average_across_replicas(params: list[nn.Parameter], group: dist.ProcessGroup) -> None:
    """The training's data-parallel reduction: one flat all-reduce, then division by the replicas."""
    if not params:
        return
    flat = gradients.flatten_grads(params)
    dist.all_reduce(flat, group=group)
    gradients.unflatten_mean(params, flat, replicas=dist.get_world_size(group))


def _use_logged_tied_grads(state: _StageState, logs: LogReader, iteration: int, record: Recorder | None) -> None:
    """A tied weight's gradient is the sum over the stages sharing it: take it as it was reduced."""
    for key in state.module.tied_stages():
        if key not in state.module.tied:
            continue
        params = list(state.module.tied[key].parameters())
        reduced = [logs.tied_grad(iteration, key, index) for index in range(len(params))]
        for param, grad in zip(params, reduced):
            if param.requires_grad:
                param.grad = grad.to(param.grad.dtype)
        if record is not None:
            record.log_tied_grads(iteration, key, reduced)


def dense_state_from_persisted(
    root: Path,
    *,
    stage: int,
    start_iteration: int,
    layers: Sequence[LayerSpec | nn.Module],
    num_stages: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    config: Config,
    data: DataSource,
    until: int | None = None,
    partition_method: str = "parameters",
    module_seed: int = 0,
) -> dict:
    """The converter: one stage's dense state from its persisted window and its neighbours'
    persisted logs (offline; recovery calls :func:`replay_stage` with live logs instead).

    ``root`` is a run's persist directory (``persist_dir/<run_id>``). Returns
    ``{"iteration", "model", "optimizer"}`` state dicts at ``until`` (default: the window's end).
    """
    module = PipelineModule(layers, num_stages, loss_fn=loss_fn, partition_method=partition_method,
                            stage_id=stage, seed=module_seed)
    opt = optimizer(module.parameters())
    window = load_persisted(root, stage=stage, replica=0, iteration=start_iteration)
    until = window.manifest.end_iteration if until is None else until
    with persisted_neighbour_logs(root, module=module, start_iteration=start_iteration) as logs:
        replay_stage(module=module, optimizer=opt, config=config, window=window, logs=logs, data=data, until=until)
    return {"iteration": until, "model": module.state_dict(), "optimizer": opt.state_dict()}


@contextlib.contextmanager
def persisted_neighbour_logs(
    root: Path, *, module: PipelineModule, start_iteration: int, replica: int = 0
) -> Iterator[LogReader]:
    """A LogReader over the logs persisted with window ``start_iteration`` by every stage the
    module's stage talks to in ``replica``'s pipeline (its neighbours and the stages sharing its
    tied weights)."""
    stage, num_stages = module.stage_id, module.num_stages
    talks_to = {stage - 1, stage + 1} | {s for stages in module.tied_stages().values() if stage in stages for s in stages}
    logs = {}
    try:
        for other in sorted(s for s in talks_to if 0 <= s < num_stages and s != stage):
            logs[other] = LogStore()
            path = window_path(root, stage=other, replica=replica, start_iteration=start_iteration)
            logs[other].import_(load_window_logs(path))
        yield LogReader(logs, stage=stage)
    finally:
        for store in logs.values():
            store.close()


def newest_common_window(root: Path, *, num_stages: int, data_parallel: int = 1) -> int:
    """The start of the newest window persisted by every stage replica, for a whole-job restart."""
    starts: dict[int, set[tuple[int, int]]] = {}
    for window in list_persisted(root):
        starts.setdefault(window.start_iteration, set()).add((window.stage, window.replica))
    everyone = {(s, r) for s in range(num_stages) for r in range(data_parallel)}
    complete = [start for start, holders in starts.items() if everyone <= holders]
    if not complete:
        found = {start: sorted(holders) for start, holders in sorted(starts.items())}
        raise MoetionError(
            f"no window under {root} was persisted by all {num_stages} stages x {data_parallel} replica(s) "
            f"(windows by start: (stage, replica) holders {found}); nothing to restart from"
        )
    return max(complete)
