"""Sparse-to-dense conversion: rebuild a stage's exact state ``S_f`` from its last complete window
plus what its neighbours logged (DESIGN.md §2.2).

The window starting at ``t0`` holds, after each step ``t0 + i``, the full snapshot of slot ``i``
and the compute snapshot of every later slot. Replay starts from capture 0 (slot 0 full, everything
else frozen at its compute weights), then for ``t = t0+1 .. f``:

1. frozen operators (slots ``>= j``, ``j = t - t0``) run forward and pass input-gradients back but
   have ``requires_grad`` off: no weight gradient, no optimizer step (any parameter type);
2. the iteration runs through the same body as training (:class:`~moetion.iteration.StageIteration`,
   same schedule, same arithmetic), reading inputs and output-gradients from the neighbours' logs
   (the first and last stage re-read inputs and labels from the data source), with the same random
   draws, the logged clip coefficient and learning-rate factor, and the logged reduced gradient of
   tied weights;
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
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from logging_store import LogStore
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from moetion.boundary import BoundaryInputs, BoundaryOutputs, Recorder
from moetion.config import Config
from moetion.data import DataSource
from moetion.data_iter import as_reading_source, restore_data_position
from moetion.errors import MoetionError
from moetion.faults import fault_point, faults_armed
from moetion.initial_state import check_initial
from moetion.model_state import load_state_tensors
from moetion.module import LayerSpec, PipelineModule
from moetion.operators import Operator, discover_operators
from moetion.decisions import LoggedDecisions
from moetion.lr_scheduler import build_lr_scheduler, restore_from_window
from moetion.iteration import (DecisionPort, InputPort, IterationStats, OutputPort, Placement, StageIteration,
                               StepHooks, no_fault)
from moetion.precision import StagePrecision
from moetion.schedule import StageSchedule
from moetion.snapshot.image import WindowImage
from moetion.snapshot.layout import expert_view
from moetion.snapshot.persist import list_persisted, load_persisted, load_window_logs, window_path
from moetion.upstream_log import LogReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayPorts:
    """The ports a replay runs its iteration body through."""

    inputs: InputPort
    outputs: OutputPort
    decisions: DecisionPort
    hooks: StepHooks


_port_adapters: list[Callable[[ReplayPorts], ReplayPorts]] = []


def adapt_replay_ports(adapter: Callable[[ReplayPorts], ReplayPorts]) -> None:
    """Registers ``adapter``, applied to the ports of every replay in this process (and in ranks it
    forks later). Negative-control tests inject a fault into replay this way: a perturbed log, a
    wrong logged decision, frozen operators never promoted."""
    _port_adapters.append(adapter)


def clear_replay_port_adapters() -> None:
    _port_adapters.clear()


@dataclass
class ReplayReport:
    start_iteration: int
    until: int
    iterations_replayed: int
    seconds: float
    last: IterationStats | None  # the statistics of the last replayed iteration


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
    inputs: InputPort | None = None,
    outputs: OutputPort | None = None,
    lr_scheduler: LRScheduler | None = None,
    initial_digest: Mapping[str, int] | None = None,
    stage_schedule: StageSchedule = StageSchedule(),
    expert_group: dist.ProcessGroup | None = None,
    expert_data_group: dist.ProcessGroup | None = None,
) -> ReplayReport:
    """Brings ``module`` and ``optimizer`` (freshly built for the window's stage) to ``S_until``.

    ``until`` must lie at or past the window's last iteration. ``window=None`` replays from the
    freshly initialised module, iterations ``0..until`` (a failure before any window completed).
    ``precision`` is the stage's compute copy when the caller keeps one (the engine does);
    otherwise one is made here. A stage trained with data parallelism replays with every replica at
    once: call this on each, passing the group of replaying replicas (its size must equal the
    training's) and each replica's own ``logs``. ``record`` receives what the stage would have sent
    and the iteration's decisions, so a replacement can serve its own neighbours' replays later.
    ``inputs``/``outputs`` replace the default ports (the logs in, ``record`` out), e.g. by live
    links to the other members of a chain of lost stages replaying together. ``lr_scheduler`` (the
    stage's, freshly built like ``optimizer``) is restored from the window and stepped as in training.
    ``initial_digest`` is the stage's :attr:`~moetion.module.PipelineModule.initial_digest` where it
    first started: a replay from the initial state checks that ``module`` was built to the same bits.
    ``stage_schedule`` is the instruction stream training ran (another for a ``torch.distributed.pipelining`` stage).
    A stage whose experts are spread over ranks (``ep_size > 1``) replays with its whole expert-parallel
    group (``expert_group``, and ``expert_data_group`` as in training): the all-to-all runs live.
    """
    precision = precision or StagePrecision(module, config.precision)
    if window is not None:
        _check_window(window, module, config, replica_group, until)
    elif initial_digest is not None:
        check_initial(module, module.initial_digest, initial_digest,
                      where=f"replay of stage {module.stage_id} from the initial state")
    first = 0 if window is None else window.manifest.start_iteration + 1
    replica = 0 if replica_group is None else dist.get_rank(replica_group)
    replicas = 1 if replica_group is None else dist.get_world_size(replica_group)
    slots = FrozenSlots(module, precision, optimizer, window)
    if window is not None:
        restore_from_window(lr_scheduler, window)
        if module.is_first_stage or module.is_last_stage:
            restore_data_position(data, window, where=f"stage {module.stage_id}")
    where = f"replay of stage {module.stage_id}"
    ports = ReplayPorts(inputs or BoundaryInputs(None, logs, where=where), outputs or BoundaryOutputs(None, record, where=where),
                        LoggedDecisions(logs, record), slots)
    for adapt in _port_adapters:
        ports = adapt(ports)
    body = StageIteration(
        module=module, precision=precision, optimizer=optimizer, config=config,
        placement=Placement(replica=replica, replicas=replicas, data_group=replica_group,
                            expert_group=expert_group, expert_data_group=expert_data_group),
        inputs=ports.inputs, outputs=ports.outputs, decisions=ports.decisions, hooks=ports.hooks,
        faults=_replay_fault_point(module.stage_id, replica), lr_scheduler=lr_scheduler,
        stage_schedule=stage_schedule,
    )
    start = time.perf_counter()
    last = None
    for t in range(first, until + 1):
        last = body.run(t, data)
    slots.set_trainable(len(slots.slot_params))
    seconds = time.perf_counter() - start
    log.info("replayed stage %d from iteration %d to %d in %.2f s", module.stage_id, first, until, seconds)
    return ReplayReport(first - 1, until, until + 1 - first, seconds, last)


def _replay_fault_point(stage: int, replica: int) -> Callable[[str, int], None]:
    """Replay's one fault point, the ``replay`` phase at the start of each replayed iteration."""
    if not faults_armed():
        return no_fault

    def fault(phase: str, iteration: int) -> None:
        if phase == "iteration":
            fault_point("replay", stage=stage, replica=replica, iteration=iteration)
    return fault


def _check_window(window: WindowImage, module: PipelineModule, config: Config,
                  replica_group: dist.ProcessGroup | None, until: int) -> None:
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


class FrozenSlots(StepHooks):
    """Replay's own part: the stage's parameters by snapshot slot, frozen until their full state appears.

    Before replay, slot 0 is loaded from the window's first capture and every later slot holds its
    compute weights, frozen; the stage's buffers and frozen parameters come from that capture too and
    then evolve as in training (the same forwards, the same optimizer hooks). After step ``t0 + j``
    slot ``j`` is promoted from its full snapshot and the still-frozen slots get their compute weights
    of that step. Without a window (replay from the initial state) every parameter trains from the start.

    A stacked parameter cannot freeze a slice by ``requires_grad``: it trains whole, every iteration,
    so its shared optimizer state (Adam's ``step``, loaded from capture 0) advances exactly as in
    training, and after each step the still-frozen slices get their compute weights back (the
    optimizer's update of them is discarded), while a promoted slice gets its weight and its
    per-element optimizer state from its full snapshot. Any optimizer works this way (plain,
    ``foreach``, fused): only the step's outcome on the frozen slices is overwritten.
    """

    def __init__(self, module: PipelineModule, precision: StagePrecision, optimizer: torch.optim.Optimizer,
                 window: WindowImage | None) -> None:
        self.module, self.precision, self.optimizer, self.window = module, precision, optimizer, window
        self.masters = dict(module.named_parameters())
        self.computes = dict(precision.compute.named_parameters())
        self.active_slots = 1
        if window is None:  # the initial state: one slot, every operator active
            self.slot_params = [[n for n, p in module.named_parameters() if p.requires_grad]]
            self.slot_slices: list[list[Operator]] = [[]]
            return
        self.operators = {op.name: op for op in discover_operators(module)}
        slotted = {op for slot in window.manifest.slots for op in slot}
        if slotted != set(self.operators):
            raise MoetionError(
                f"the window's operators do not match the model: only in the window {sorted(slotted - set(self.operators))}, "
                f"only in the model {sorted(set(self.operators) - slotted)}"
            )
        slots = [[self.operators[op] for op in slot] for slot in window.manifest.slots]
        self.slot_params = [[n for op in slot if not op.sliced for n in op.param_names] for slot in slots]
        self.slot_slices = [[op for op in slot if op.sliced] for slot in slots]
        self._shape_stacked_state()
        self.load(0)

    def after_step(self, iteration: int) -> None:
        if self.window is None:
            return
        j = iteration - self.window.manifest.start_iteration
        if j < self.window.manifest.window:
            self.load(j)

    def frozen_slices(self) -> list[tuple[str, int]]:
        """(stacked parameter, expert) of every slice still frozen: their values are compute weights."""
        return [(name, op.expert) for slot in self.slot_slices[self.active_slots:] for op in slot
                for name in op.param_names]

    def load(self, j: int) -> None:
        """After step t0+j: slot j becomes active from its full snapshot; later slots get compute weights."""
        capture = self.window.manifest.captures[j]
        with torch.no_grad():
            for entry in capture.entries:
                value = self.window.tensor(entry)
                operator = self.operators.get(entry.operator)  # None for the stage-state entries
                if entry.role == "weight":
                    expert_view(operator, self.masters[entry.param]).copy_(value)
                elif entry.role.startswith("optim."):
                    key = entry.role[len("optim."):]
                    state = self.optimizer.state[self.masters[entry.param]]
                    if operator is not None and operator.sliced:
                        expert_view(operator, state[key]).copy_(value)
                    else:
                        state[key] = value
                elif entry.role == "compute":
                    expert_view(operator, self.computes[entry.param]).copy_(value)
                elif entry.role == "state":
                    load_state_tensors(self.module, {entry.param: value})
            if self.precision.compute is not self.module:
                for name in self.slot_params[j]:
                    self.computes[name].copy_(self.masters[name])
                for op in self.slot_slices[j]:
                    for name in op.param_names:
                        expert_view(op, self.computes[name]).copy_(expert_view(op, self.masters[name]))
        self.set_trainable(j + 1)

    def set_trainable(self, active_slots: int) -> None:
        """Slots below ``active_slots`` train; the rest are frozen (forward and input-gradients only)."""
        self.active_slots = active_slots
        for i, names in enumerate(self.slot_params):
            for name in names:
                self.masters[name].requires_grad_(i < active_slots)
                self.computes[name].requires_grad_(i < active_slots)

    def _shape_stacked_state(self) -> None:
        """Gives every stacked parameter its full optimizer state before the first replayed step:
        zeros where slices are still to be promoted (their values are loaded then), so the optimizer
        never initialises it lazily (which would restart the shared ``step`` at 0)."""
        for capture in self.window.manifest.captures:
            for entry in capture.entries:
                operator = self.operators.get(entry.operator)
                if operator is not None and operator.sliced and entry.role.startswith("optim."):
                    param = self.masters[entry.param]
                    state = self.optimizer.state[param]
                    key = entry.role[len("optim."):]
                    if key not in state:
                        state[key] = torch.zeros(param.shape, dtype=getattr(torch, entry.dtype.split(".")[-1]),
                                                 device=param.device)


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
    lr_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
) -> dict:
    """The converter: one stage's dense state from its persisted window and its neighbours'
    persisted logs (offline; recovery calls :func:`replay_stage` with live logs instead).

    ``root`` is a run's persist directory (``persist_dir/<run_id>``). Returns
    ``{"iteration", "model", "optimizer"}`` state dicts at ``until`` (default: the window's end).
    A run trained with an LR scheduler needs the same factory as ``lr_scheduler``; one trained on a
    data_iter needs a fresh loader built the same way as ``data`` (its position comes from the window).
    """
    module = PipelineModule(layers, num_stages, loss_fn=loss_fn, partition_method=partition_method,
                            stage_id=stage, seed=module_seed)
    opt = optimizer(module.parameters())
    scheduler = build_lr_scheduler(lr_scheduler, opt, config.lr_schedule)
    if module.is_first_stage or module.is_last_stage:
        data = as_reading_source(data, where=f"stage {stage}")
    window = load_persisted(root, stage=stage, replica=0, iteration=start_iteration)
    until = window.manifest.end_iteration if until is None else until
    with persisted_neighbour_logs(root, module=module, start_iteration=start_iteration) as logs:
        replay_stage(module=module, optimizer=opt, config=config, window=window, logs=logs, data=data, until=until,
                     lr_scheduler=scheduler)
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
        first = next(module.parameters(), None)
        yield LogReader(logs, stage=stage, device=first.device if first is not None else "cpu")
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
