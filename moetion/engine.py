"""The pipeline engine: one stage's training loop, one iteration per ``train_batch``.

The arithmetic of an iteration lives in :class:`~moetion.iteration.StageIteration`; the engine
plugs it into the live world (links to the neighbours teed into the upstream log, the commit
all-gather, the sparse checkpointer around the optimizer step) and, under the supervisor, hands
a lost peer to recovery, which sees the engine only through
:class:`~moetion.recovery.stage.RecoverableStage`.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Protocol

import torch
from logging_store import LogStoreConfig
from torch.optim.lr_scheduler import LRScheduler

from moetion.boundary import BoundaryInputs, BoundaryOutputs
from moetion.config import Config
from moetion.control import ControlPlane
from moetion.data import DataSource
from moetion.data_iter import STATE_KEY as DATA_ITER_KEY, DataExhausted, IteratorSource
from moetion.determinism import Pass
from moetion.decisions import LiveDecisions
from moetion.distributed import DistContext, build_context, join_job, leave_process_group
from moetion.errors import ConfigError, DataError, PeerFailure
from moetion.expert_parallel import sharded_norm
from moetion.faults import fault_point, faults_armed
from moetion import initial_state
from moetion.initial_state import InitialDigest
from moetion.iteration import InputPort, IterationStats, OutputPort, Placement, StageIteration, no_fault
from moetion.lr_scheduler import STATE_KEY as SCHEDULER_KEY, restore_scheduler, scheduler_state
from moetion.metrics import open_rank_metrics
from moetion.module import PipelineModule
from moetion.p2p import StageLinks
from moetion.precision import StagePrecision
from moetion.recovery.coordinator import Recovery
from moetion.recovery.records import RecoveryEvents
from moetion.recovery.stage import Seat, StageState
from moetion.replay import ReplayReport, newest_common_window, persisted_neighbour_logs, replay_stage
from moetion.schedule import StageSchedule
from moetion.run_identity import fresh_job_nonce, resume_requested
from moetion.run_layout import persist_root, run_id
from moetion.snapshot.checkpointer import SparseCheckpointer, StageIdentity
from moetion.snapshot.hooks import SnapshotHooks
from moetion.snapshot.image import SnapshotError, WindowImage
from moetion.snapshot.persist import load_persisted
from moetion.snapshot.run_dir import check_resumable, claim_run_dir
from moetion.snapshot.replica import PeerReplicator, replication_peers
from moetion.upstream_log import IterationScalars, LogReader, UpstreamLog, store_config

log = logging.getLogger(__name__)

_close_hooks: list[Callable[["PipelineEngine"], None]] = []


def on_close(hook: Callable[["PipelineEngine"], None]) -> None:
    """Registers ``hook(engine)`` to run at the end of every :meth:`PipelineEngine.close` in this
    process (the fault harness leaves each rank's final state this way)."""
    _close_hooks.append(hook)


class ExternalMicroBatches(Protocol):
    """An outside schedule that runs each iteration's micro-batches (``torch.distributed.pipelining``)."""

    def run(self, iteration: int, data: DataSource) -> list[torch.Tensor]:
        """Runs every forward, backward and send of ``iteration``; returns the last stage's losses in
        micro-batch order (none elsewhere); raises :class:`PeerFailure` when a peer is lost."""

    def connected(self) -> None:
        """Called each time the engine has joined a generation's groups, before its next iteration."""


class PipelineEngine:
    """Trains one pipeline stage; create it with :func:`moetion.initialize`."""

    def __init__(
        self,
        *,
        module: PipelineModule,
        optimizer: torch.optim.Optimizer,
        config: Config,
        dist_context: DistContext,
        threads: int,
        control: ControlPlane | None = None,
        generation: int = 0,
        replacement: bool = False,
        lr_scheduler: LRScheduler | None = None,
        stage_schedule: StageSchedule = StageSchedule(),
        micro_batches: ExternalMicroBatches | None = None,
    ) -> None:
        self.module = module
        # An outside schedule (torch.distributed.pipelining) may run each iteration's micro-batches;
        # the commit still runs here.
        self.stage_schedule, self._micro_batches = stage_schedule, micro_batches
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.config = config
        self.threads = threads
        self.iteration = 0
        self.last_stats: IterationStats | None = None
        self.losses: dict[int, float] = {}  # every committed iteration's loss this process knows
        self._started_at = time.time()
        self._data_iter: IteratorSource | None = None  # a reading stage's train_batch(data_iter=...), wrapped
        self._data_ended: str | None = None  # why a data_iter-driven loop must stop, once it must
        self.precision = StagePrecision(module, config.precision)
        self.dist = dist_context
        if dist_context.topology.data_parallel > 1 and not replacement:  # a replacement copies a live replica
            initial_state.check_replicas_agree(module, module.initial_digest, group=dist_context.data_group,
                                               device=dist_context.device, where=f"stage {module.stage_id}")
        self.checkpointer = self._build_checkpointer() if config.snapshot.enabled else None
        if self.checkpointer is not None and lr_scheduler is not None:
            self.checkpointer.window_state[SCHEDULER_KEY] = lambda: scheduler_state(lr_scheduler)
        if self.checkpointer is not None and not replacement:
            self.checkpointer.shm.clear()  # a replacement restores from these; anyone else starts afresh
        if self.checkpointer is not None and self.checkpointer.group_keeping:
            # Expert parallelism: a replica may have to replay with its stage from the initial state.
            self.checkpointer.initial_state = self._initial_copy()
        self.upstream = self._build_upstream_log() if config.upstream_log.enabled else None
        self._norm_params = self._params_counted_in_norm()
        self._connect(dist_context)
        self.metrics = open_rank_metrics(self)  # None unless config.metrics.dir is set
        # A replacement that replays from the initial state checks its build against its predecessor's.
        self._initial_digest = None if control is None else self._share_initial_digest(control, replacement)
        # Under a supervisor a lost peer is recovered from; a process started into a later
        # generation is a replacement and restores its stage before its first iteration.
        self.recovery = None if control is None else Recovery(
            self, control, generation=generation, needs_restore=replacement, timeout_s=config.peer_timeout_s)

    @property
    def stage(self) -> int:
        return self.module.stage_id

    def train_batch(self, data: DataSource | None = None, *, data_iter: Iterable | Iterator | None = None) -> float:
        """Runs iteration ``self.iteration`` over ``config.micro_batches`` micro-batches.

        The micro-batches come from ``data``, addressable by (iteration, micro-batch), or from
        ``data_iter`` (DeepSpeed's name): an iterator or loader yielding ``(inputs, labels)``
        micro-batches, resumable after a failure when it has ``state_dict()``/``load_state_dict()``
        (a torchdata ``StatefulDataLoader``); see :mod:`moetion.data_iter`. When a data_iter ran
        out, the next call raises :class:`~moetion.data_iter.DataExhausted` on every rank.

        Returns the iteration's mean loss (over micro-batches and data-parallel replicas), the
        same value on every rank. The optimizer step is the commit point: when this returns,
        every rank of the job has applied the same iteration. Under the supervisor, a survivor
        that loses a peer pauses, rebuilds and re-runs the interrupted iteration, and a
        replacement's first call restores its stage to the job's iteration, then trains it with
        the others. (Only when the job had already finished training does that first call end
        with the restore, returning the last replayed iteration's loss.) Drive the loop with
        ``engine.iteration``.
        """
        data = self._reading_source(data, data_iter)
        if self._data_ended is not None:
            raise DataExhausted(f"stage {self.stage}: {self._data_ended}; every committed iteration is kept: "
                                "stop the loop and close()")
        if self.recovery is not None and self.recovery.needs_restore:
            if self.recovery.restore(data).finished:
                if data_iter is not None:  # the others left a loop that a data_iter running out ends
                    self._data_ended = (f"the job had finished training at iteration {self.iteration - 1} when "
                                        "this stage was restored")
                return self.last_stats.loss
        while True:
            try:
                return self._run_iteration(data)
            except PeerFailure as failure:
                if self.recovery is None:
                    raise
                cause = str(failure)
            # Outside the except block: a live traceback would keep the broken group's sockets open.
            self.recovery.after_failure(cause, data)

    def _run_iteration(self, data: DataSource) -> float:
        self._started_at = time.time()
        if self._micro_batches is None:
            stats = self._body.run(self.iteration, data)
        else:
            stats = self._body.run_external(self.iteration, data, lambda: self._micro_batches.run(self.iteration, data))
        if self._body.decisions.data_ended:
            self._data_ended = f"the data_iter of a reading stage ran out after iteration {self.iteration}"
        self.last_stats = stats
        self.losses[self.iteration] = stats.loss
        if self.metrics is not None:
            self.metrics.after_commit(self)
        self.iteration += 1
        return stats.loss

    def micro_batch(self, m: int, pass_: Pass) -> ContextManager:
        """The unit of work of micro-batch ``m`` in the iteration in flight, for an outside schedule
        to run its forward or backward in (the fault point of the pass fires first)."""
        self._body.faults(pass_.value, self.iteration)
        return self._body.unit_of_work(m, pass_)

    def expert_token_counts(self) -> dict[str, torch.Tensor]:
        """Tokens this replica routed to each expert of each MoE layer on this stage in the last
        iteration, keyed by the layer's name in the stage module (its name in the whole model)."""
        return dict(self._body.token_counts)

    def load_checkpoint(self, data: DataSource | None = None, root: str | Path | None = None, *,
                        data_iter: Iterable | Iterator | None = None) -> int:
        """Whole-job restart: rebuilds this stage from the newest window persisted by every stage.

        Call on every rank right after :func:`moetion.initialize`, before training. Each stage replays
        its window from disk with its neighbours' persisted logs (the same conversion as the offline
        converter), so training continues bit-identically to a run that never stopped. ``root``
        defaults to ``snapshot.persist_dir/<run_id>``. Returns the iteration training continues at.
        A ``data_iter`` (a fresh, resumable one, as passed to ``train_batch``) resumes at the next batch.
        """
        data = self._reading_source(data, data_iter)
        root = Path(root) if root is not None else persist_root(self.config.snapshot)
        if root is None:
            raise ConfigError("load_checkpoint needs snapshot.persist_dir (or an explicit root)")
        replicas, replica = self.dist.topology.data_parallel, self.dist.replica
        check_resumable(root, num_stages=self.module.num_stages, data_parallel=replicas)
        start = newest_common_window(root, num_stages=self.module.num_stages, data_parallel=replicas)
        window = load_persisted(root, stage=self.stage, replica=replica, iteration=start)
        with persisted_neighbour_logs(root, module=self.module, start_iteration=start, replica=replica) as logs:
            replay_stage(module=self.module, optimizer=self.optimizer, config=self.config, window=window,
                         logs=logs, data=data, until=window.manifest.end_iteration, precision=self.precision,
                         replica_group=self.dist.data_group if replicas > 1 else None, lr_scheduler=self.lr_scheduler,
                         stage_schedule=self.stage_schedule, expert_group=self.dist.expert_group,
                         expert_data_group=self.dist.expert_data_group)
        self.iteration = window.manifest.end_iteration + 1
        log.info("restarted from window %d..%d under %s; continuing at iteration %d",
                 start, window.manifest.end_iteration, root, self.iteration)
        return self.iteration

    def close(self) -> None:
        """Waits for background snapshot work and stops its threads, then runs the hooks registered
        with :func:`on_close`. Under the supervisor it first waits for every rank to finish, serving
        the restore of one lost after the last commit."""
        if self.checkpointer is not None:
            self.checkpointer.drain(timeout_s=self.config.peer_timeout_s)
        if self.recovery is not None:
            self.recovery.finish()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.metrics is not None:
            self.metrics.close()
        for hook in _close_hooks:
            hook(self)

    # -- RecoverableStage: what recovery sees --------------------------------------------------------
    def seat(self) -> Seat:
        return Seat(self.dist.rank, self.stage, self.dist.replica, self.dist.topology, self.dist.device,
                    self.module.tied_stages())

    def loss_history(self) -> dict[int, float]:
        return dict(self.losses)

    def adopt_losses(self, losses: dict[int, float]) -> None:
        for t, loss in losses.items():
            self.losses.setdefault(t, loss)

    def in_flight_since(self) -> float:
        return self._started_at

    def abandon_iteration(self) -> None:
        self._body.abandon()
        if self.upstream is not None:
            self.upstream.drop_from(self.iteration)
        if self.checkpointer is not None:
            self.checkpointer.abandon_iteration()

    def leave_group(self) -> None:
        """Tears down this rank's process groups (threads blocked in them fail and exit)."""
        if self.checkpointer is not None:
            self.checkpointer.replace_replicator(None)
        self._body = None  # its links' pending sends hold the group's sockets open; neighbours must see them close
        self.dist = replace(self.dist, pipeline_group=None, data_group=None, tied_groups={}, replication_group=None,
                            expert_group=None, expert_data_group=None)
        leave_process_group()

    def join_group(self, control: ControlPlane, generation: int) -> bool:
        if not join_job(control, generation, timeout_s=self.config.peer_timeout_s):
            return False
        self._connect(build_context(num_stages=self.module.num_stages, tied_stages=self.module.tied_stages(),
                                    replication=self.config.snapshot.enabled and self.config.snapshot.replicate,
                                    expert_parallel=self.module.ep_size))
        return True

    def window_schedule(self) -> tuple[int, int]:
        return self.checkpointer.schedule() if self.checkpointer is not None else (-1, 0)

    def held_replica(self) -> WindowImage | None:
        ckpt = self.checkpointer
        return ckpt.replicator.held() if ckpt is not None and ckpt.replicator is not None else None

    def own_window_start(self) -> int | None:
        if self.checkpointer is None:
            return None
        self.checkpointer.worker.fence()  # a window being published now is complete before it is announced
        try:
            return self.checkpointer.shm.complete_start()
        except SnapshotError as error:
            log.info("no usable window in shared memory: %s", error)
            return None

    def held_starts(self) -> list[int]:
        return self.checkpointer.held_starts() if self.checkpointer is not None else []

    def shm_window(self, start: int | None = None) -> WindowImage | None:
        if self.checkpointer is None:
            return None
        shm = self.checkpointer.shm
        try:
            return shm.load_complete() if start is None else shm.load_kept(start)
        except SnapshotError as error:
            log.info("no usable window in shared memory: %s", error)
            return None

    def reset_to_initial(self) -> None:
        kept = self.checkpointer.initial_state if self.checkpointer is not None else None
        if not isinstance(kept, StageState):
            raise PeerFailure(f"rank {self.dist.rank} no longer holds its stage's initial state")
        self.module.load_state_dict(kept.model)
        self.optimizer.load_state_dict(kept.optimizer)
        if self.lr_scheduler is not None:
            restore_scheduler(self.lr_scheduler, kept.lr_scheduler)
        self.precision.refresh()

    def persist_root(self) -> Path | None:
        return persist_root(self.config.snapshot)

    def logs_kept_from(self) -> int | None:
        return self.upstream.kept_from if self.upstream is not None else None

    def export_logs(self, start: int, stop: int) -> bytes:
        return self.upstream.export(start, stop) if self.upstream is not None else b""

    def received_log_config(self) -> LogStoreConfig | None:
        return self.upstream.store.config if self.upstream is not None else None

    def recorder(self) -> UpstreamLog | None:
        return self.upstream

    def state(self) -> StageState:
        nan = float("nan")
        history = {t: IterationScalars(nan, nan, nan, loss) for t, loss in self.losses.items()}
        if self.last_stats is not None:
            s = self.last_stats
            history[s.iteration] = IterationScalars(s.lr_factor, s.grad_norm, s.clip_coef, s.loss)
        scheduler = scheduler_state(self.lr_scheduler) if self.lr_scheduler is not None else None
        return StageState(self.module.state_dict(), self.optimizer.state_dict(), history, scheduler)

    def reoffer_window(self, restoring: list[int]) -> None:
        ckpt = self.checkpointer
        if ckpt is None or ckpt.replicator is None or ckpt.replicator.send_to not in restoring:
            return
        image = ckpt.newest_image()
        if image is not None:
            ckpt.replicator.offer(image)

    def load_state(self, state: StageState, *, resume: int) -> None:
        if self._data_iter is not None:
            raise DataError(f"stage {self.stage} (replica {self.dist.replica}) reads a data_iter and was restored by "
                            "copying a live data-parallel replica, whose loader position is not its own: use an "
                            "addressable moetion.DatasetSource with data parallelism")
        self.module.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        if self.lr_scheduler is not None:
            restore_scheduler(self.lr_scheduler, state.lr_scheduler)
        self.precision.refresh()
        self._adopt_history(state.history, last=None)
        if self.upstream is not None:
            self.upstream.kept_from = resume  # it logs from now on; the replica's logs are its own
        self.iteration = resume

    def replay(self, window: WindowImage | None, logs: LogReader, data: DataSource, *, resume: int,
               inputs: InputPort | None = None, outputs: OutputPort | None = None, together: bool = False,
               survivor: bool = False) -> ReplayReport | None:
        report = None
        if resume > 0:
            groups = {}
            if together:
                groups = dict(replica_group=self.dist.data_group, expert_group=self.dist.expert_group,
                              expert_data_group=self.dist.expert_data_group)
            report = replay_stage(module=self.module, optimizer=self.optimizer, config=self.config, window=window,
                                  logs=logs, data=data, until=resume - 1, precision=self.precision,
                                  record=None if survivor else self.upstream, inputs=inputs, outputs=outputs,
                                  lr_scheduler=self.lr_scheduler, initial_digest=self._initial_digest,
                                  stage_schedule=self.stage_schedule, **groups)
            first = report.start_iteration + 1
            self._adopt_history({t: logs.scalars(t) for t in range(first, resume)}, last=report.last)
        if survivor:
            if self.checkpointer is not None:
                self.checkpointer.refresh_window_sources()
            self.iteration = resume
            return report
        if self.upstream is not None:
            self.upstream.kept_from = (window.manifest.start_iteration if window is not None else -1) + 1
        self.iteration = resume
        return report

    def adopt_schedule(self, *, start: int, window: int, resume: int, restored_start: int) -> None:
        if self.checkpointer is not None:
            self.checkpointer.adopt_schedule(start=start, window=window, resume=resume, restored_start=restored_start)

    def recovered(self, generation: int, events: RecoveryEvents) -> None:
        if self.metrics is not None:
            self.metrics.recovery(self, generation, events)

    def _adopt_history(self, history: dict[int, IterationScalars], *, last: IterationStats | None) -> None:
        """A restored stage takes over the losses (and last statistics) of iterations it did not train."""
        for t, s in history.items():
            self.losses[t] = s.loss
        if last is not None:
            self.last_stats = last
        elif history:
            t = max(history)
            s = history[t]
            self.last_stats = IterationStats(t, s.loss, s.grad_norm, s.clip_coef, s.lr_factor, float("nan"))

    def _reading_source(self, data: DataSource | None, data_iter: Iterable | Iterator | None) -> DataSource | None:
        """``data``, or the data_iter wrapped once (a reading stage's position then rides in its windows)."""
        if data is not None and data_iter is not None:
            raise ConfigError("train_batch takes data or data_iter, not both")
        if data_iter is None or not (self.module.is_first_stage or self.module.is_last_stage):
            return data  # a middle stage never reads
        if self._data_iter is None:
            self._data_iter = IteratorSource(data_iter, where=f"stage {self.stage} (rank {self.dist.rank})")
            if self.checkpointer is not None:
                self.checkpointer.window_state[DATA_ITER_KEY] = self._data_iter.window_state
                self.checkpointer.initial_state = None  # an iterator cannot go back to its start
        elif self._data_iter.loader is not data_iter:  # e.g. iter(loader) per call: each would restart the epoch
            raise ConfigError(f"stage {self.stage}: train_batch got another data_iter than before; pass the same "
                              "loader or iterator object every call")
        return self._data_iter

    # -- building ------------------------------------------------------------------------------------
    def _initial_copy(self) -> StageState:
        """The stage as built (weights, buffers, the optimizer without state, the LR scheduler)."""
        model = {name: t.detach().clone() for name, t in self.module.state_dict().items()}
        scheduler = scheduler_state(self.lr_scheduler) if self.lr_scheduler is not None else None
        return StageState(model, copy.deepcopy(self.optimizer.state_dict()), {}, scheduler)

    def _share_initial_digest(self, control: ControlPlane, replacement: bool) -> InitialDigest | None:
        """A rank of the first start records its stage's initial digest; a replacement reads it."""
        rank = self.dist.rank
        if not replacement:
            control.record_initial_digest(rank, initial_state.encode(self.module.initial_digest))
            return None
        raw = control.initial_digest(rank)
        return None if raw is None else initial_state.decode(raw, source=f"control store, rank {rank}")

    def _connect(self, context: DistContext) -> None:
        """Plugs the iteration body into this generation's groups: live links teed into the log."""
        self.dist = context
        where = f"stage {self.stage}, rank {context.rank}"
        links = StageLinks(prev_rank=context.neighbour(-1), next_rank=context.neighbour(+1),
                           timeout_s=self.config.peer_timeout_s, device=context.device)
        replicas = context.topology.data_parallel
        self._body = StageIteration(
            module=self.module, precision=self.precision, optimizer=self.optimizer, config=self.config,
            placement=Placement(context.replica, replicas, context.data_group if replicas > 1 else None,
                                context.device, context.expert_group, context.expert_data_group),
            inputs=BoundaryInputs(links, where=where),
            outputs=BoundaryOutputs(links, self.upstream, where=where),
            decisions=LiveDecisions(
                num_stages=self.module.num_stages, pipeline_group=context.pipeline_group,
                tied_groups=context.tied_groups, norm_params=self._norm_params, grad_clip=self.config.grad_clip,
                lr_schedule=self.config.lr_schedule, loss_divisor=self.config.micro_batches * replicas,
                checkpointer=self.checkpointer, log=self.upstream, device=context.device, where=where,
                sharded_norm=sharded_norm(self.module, self._norm_params, context.expert_group)),
            hooks=SnapshotHooks(self.checkpointer, self.upstream) if self.checkpointer is not None else None,
            faults=self._fault_point if faults_armed() else no_fault, lr_scheduler=self.lr_scheduler,
            stage_schedule=self.stage_schedule,
        )
        if self.checkpointer is not None:
            self.checkpointer.replace_replicator(self._build_replicator())
        if self._micro_batches is not None:
            self._micro_batches.connected()

    def _build_upstream_log(self) -> UpstreamLog:
        settings = self.config.upstream_log
        log_ = UpstreamLog(stage=self.stage, store_config=store_config(settings, local_ranks=self.dist.local_world_size))
        if self.checkpointer is not None:
            self.checkpointer.log_exporter = log_.export
        return log_

    def _build_checkpointer(self) -> SparseCheckpointer:
        nonce, root = fresh_job_nonce(), persist_root(self.config.snapshot)
        if root is not None:  # a fresh job never adopts another job's run directory
            nonce = claim_run_dir(root, self.config, fresh_nonce=nonce, resume=resume_requested(),
                                  writer=self.dist.rank == 0)
        identity = StageIdentity(
            run_id=run_id(self.config.snapshot), job_nonce=nonce, stage=self.stage, replica=self.dist.replica,
            data_parallel=self.dist.topology.data_parallel, threads=self.threads, precision=self.config.precision,
            expert_parallel=self.module.ep_size,
        )
        return SparseCheckpointer(master=self.module, compute=self.precision.compute, optimizer=self.optimizer,
                                  config=self.config.snapshot, identity=identity)

    def _build_replicator(self) -> PeerReplicator | None:
        peers = replication_peers(self.dist.topology, self.dist.rank)
        if self.dist.replication_group is None or peers is None:
            return None
        return PeerReplicator(group=self.dist.replication_group, send_to=peers[0], receive_from=peers[1],
                              stage=self.stage, replica=self.dist.replica)

    def _params_counted_in_norm(self) -> list[torch.nn.Parameter]:
        """This stage's trainable parameters, minus tied copies whose norm another stage counts."""
        skip = {
            id(p)
            for key, stages in self.module.tied_stages().items()
            if self.stage in stages and self.module.tied_parameter_owner(key) != self.stage
            for p in self.module.tied[key].parameters()
        }
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in skip]

    def _fault_point(self, phase: str, iteration: int) -> None:
        if phase != "iteration":
            fault_point(phase, stage=self.stage, replica=self.dist.replica, iteration=iteration)
