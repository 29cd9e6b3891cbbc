"""Localized recovery, one rank's side: survivors pause in place, a replacement restores and rejoins.

A survivor that loses a peer (a failed or timed-out send, receive or collective) abandons the
in-flight iteration (its committed state is untouched: the optimizer step is the commit point),
leaves the broken process group, and waits for the supervisor's next generation. A replacement
starts in that generation. Then, in the new group, every rank:

1. all-gathers its :class:`~moetion.recovery.plan.RankStatus` and computes the same
   :class:`~moetion.recovery.plan.RecoveryPlan` (resume iteration, a tier per lost rank);
2. survivors send what the plan asks of them (logs, a window replica, a replica's state);
   a restoring rank loads its window, receives the logs and replays up to the resume iteration;
3. waits until every restoring rank is ready, then trains on. Survivors never re-execute anything.

A failure during any of this (the replacement dies mid-replay) just starts the next generation.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from logging_store import LogStore

from moetion.control import ControlPlane, JobAborted
from moetion.data import DataSource
from moetion.errors import MoetionError, PeerFailure
from moetion.p2p import StageLinks
from moetion.recovery import transfer
from moetion.recovery.chain import ChainReader, ChainRecorder
from moetion.recovery.plan import NOT_LOGGING, RankStatus, RecoveryImpossible, RecoveryPlan, Restore, plan_recovery
from moetion.replay import replay_stage
from moetion.snapshot.image import SnapshotError, WindowImage
from moetion.snapshot.persist import list_persisted, load_persisted
from moetion.snapshot.checkpointer import run_id
from moetion.upstream_log import IterationScalars, LogReader

if TYPE_CHECKING:
    from moetion.engine import PipelineEngine

log = logging.getLogger(__name__)


class Recovery:
    """Drives one rank through recoveries; owned by its engine."""

    def __init__(self, engine: "PipelineEngine", control: ControlPlane, *, generation: int, needs_restore: bool) -> None:
        self.engine, self.control = engine, control
        self.generation = generation
        self.needs_restore = needs_restore
        self.timeout_s = engine.config.peer_timeout_s
        self._held: WindowImage | None = None
        self._shm_image: WindowImage | None = None
        self.started_at = time.time()  # the engine was made right after joining the group

    # -- entry points ----------------------------------------------------------------------------
    def after_failure(self, cause: str, data: DataSource) -> None:
        """A survivor lost a peer in the middle of an iteration: pause in place, rebuild, go on."""
        now = time.time()
        events: dict[str, Any] = {"role": "survivor", "detected_at": now, "cause": cause,
                                  "iteration": self.engine.iteration,
                                  "inflight_s": now - self.engine.iteration_started_at}  # work now discarded
        log.warning("%s; pausing in place until the job is rebuilt", cause.split(": [")[0])
        self.engine.abandon_iteration()
        self.engine.leave_group()
        self._rebuild(data, events, joined=False)

    def restore(self, data: DataSource) -> None:
        """A replacement's first act, in the generation it was started into."""
        events: dict[str, Any] = {"role": "replacement", "joined_at": self.started_at, "restore_at": time.time()}
        self._rebuild(data, events, joined=True)

    def finish(self) -> None:
        """Before closing: wait until every rank has finished. A rank lost after the last commit is
        still replaced and restored (its final state is part of the result), with the finished
        survivors serving its restore."""
        rank, world = self.engine.dist.rank, self.engine.dist.topology.world_size
        self.control.mark_done(self.generation, rank)
        while not self.control.wait_done(self.generation, world, timeout_s=self.timeout_s):
            events: dict[str, Any] = {"role": "survivor", "detected_at": time.time(), "cause": "finished; a rank was lost",
                                      "iteration": self.engine.iteration, "inflight_s": 0.0}
            self.engine.leave_group()
            self._rebuild(None, events, joined=False)
            self.control.mark_done(self.generation, rank)

    # -- the generation loop ---------------------------------------------------------------------
    def _rebuild(self, data: DataSource | None, events: dict[str, Any], *, joined: bool) -> None:
        while True:
            if not joined:
                self.generation = self.control.wait_for_generation_after(self.generation, timeout_s=self.timeout_s)
                if not self.engine.join_group(self.control, self.generation):
                    continue
                events["joined_at"] = time.time()
                if self.needs_restore:
                    events["restore_at"] = events["joined_at"]
            joined = False
            failure = None
            try:
                self._handoff(data, events)
            except PeerFailure as error:
                failure = str(error)
            if failure is None:
                events["resumed_at"] = time.time()
                self.control.record(self.generation, self.engine.dist.rank, events)
                return
            log.warning("generation %d failed during recovery (%s); waiting for the next", self.generation, failure)
            events.setdefault("retries", []).append(failure)
            self.engine.leave_group()

    def _handoff(self, data: DataSource | None, events: dict[str, Any]) -> None:
        plan = self._agree()
        events["plan"] = {"resume": plan.resume, "restores": [vars(r) for r in plan.restores]}
        rank = self.engine.dist.rank
        mine = plan.restore_of(rank)
        if mine is None:
            events["bytes_sent"] = self._serve(plan)
        else:
            self._restore(plan, mine, data, events)
            self.needs_restore = False
            self.control.mark_ready(self.generation, rank)
            events["ready_at"] = time.time()
        if not self.control.wait_ready(self.generation, plan.restoring_ranks, timeout_s=self.timeout_s):
            raise PeerFailure(f"a rank failed while generation {self.generation} was restoring")

    def _agree(self) -> RecoveryPlan:
        mine = self._status().to_tensor()
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        try:
            dist.all_gather(gathered, mine)
        except RuntimeError as error:
            raise PeerFailure(f"exchanging recovery status: {str(error).splitlines()[0]}") from None
        statuses = [RankStatus.from_tensor(t) for t in gathered]
        try:
            return plan_recovery(statuses, topology=self.engine.dist.topology,
                                 tied_stages=self.engine.module.tied_stages())
        except RecoveryImpossible as error:
            self.control.declare_fatal(str(error))
            raise JobAborted(str(error)) from None

    def _status(self) -> RankStatus:
        engine = self.engine
        ckpt, upstream = engine.checkpointer, engine.upstream
        if self.needs_restore:
            return RankStatus(-1, True, shm_start=self._shm_start(), disk_start=self._disk_start())
        held = ckpt.replicator.held() if ckpt is not None and ckpt.replicator is not None else None
        self._held = held  # the replica this rank announced; a newer one may arrive before it is sent
        start, window = ckpt.schedule() if ckpt is not None else (-1, 0)
        return RankStatus(
            engine.iteration, False,
            held_start=held.manifest.start_iteration if held is not None else -1,
            window_start=start, window=window,
            log_kept_from=upstream.kept_from if upstream is not None else NOT_LOGGING,
        )

    # -- survivors -----------------------------------------------------------------------------------
    def _serve(self, plan: RecoveryPlan) -> int:
        """Sends, in the plan's order, what this survivor owes the restoring ranks; returns bytes sent."""
        engine, rank, sent = self.engine, self.engine.dist.rank, 0
        for restore in plan.restores:
            if restore.donor == rank and restore.source == "replica":
                history = {t: s.to_tensor() for t, s in engine.history().items()}
                transfer.send_state(engine.module, engine.optimizer, history, restore.rank)
            elif restore.donor == rank and restore.source == "peer":
                transfer.send_window(self._held, restore.rank)
                sent += self._held.manifest.blob_bytes
            if rank in restore.log_sources:
                logs = engine.upstream.export(restore.replay_from, plan.resume) if engine.upstream else b""
                transfer.send_bytes(logs, restore.rank, what="upstream logs")
                sent += len(logs)
        self._reoffer_window(plan)
        return sent

    def _reoffer_window(self, plan: RecoveryPlan) -> None:
        """The replica a replacement held for us died with its predecessor: send our window again."""
        ckpt = self.engine.checkpointer
        if ckpt is None or ckpt.replicator is None or ckpt.replicator.send_to not in plan.restoring_ranks:
            return
        image = ckpt.newest_image()
        if image is not None:
            ckpt.replicator.offer(image)

    # -- the restoring rank ----------------------------------------------------------------------------
    def _restore(self, plan: RecoveryPlan, restore: Restore, data: DataSource, events: dict[str, Any]) -> None:
        engine = self.engine
        events["source"] = restore.source
        if restore.source == "replica":
            state = transfer.recv_state(restore.donor, timeout_s=self.timeout_s)
            engine.module.load_state_dict(state["model"])
            engine.optimizer.load_state_dict(state["optimizer"])
            engine.precision.after_step()
            engine.adopt_history({t: IterationScalars.from_tensor(v) for t, v in state["history"].items()})
            if engine.upstream is not None:
                engine.upstream.kept_from = plan.resume  # it logs from now on; the replica's logs are its own
            events["state_loaded_at"] = events["logs_received_at"] = time.time()
            events.update(replayed=0, replay_s=0.0, bytes_received=0)
        else:
            image = self._load_window(restore)
            events.update(state_loaded_at=time.time(), window_bytes=image.manifest.blob_bytes if image is not None else 0)
            stores, received = self._receive_logs(restore)
            events.update(logs_received_at=time.time(), bytes_received=received)
            try:
                reader, recorder = self._replay_io(restore, stores)
                report = replay_stage(module=engine.module, optimizer=engine.optimizer, config=engine.config,
                                      window=image, logs=reader, data=data, until=plan.resume - 1,
                                      precision=engine.precision, record=recorder) if plan.resume > 0 else None
                engine.adopt_history(_logged_scalars(reader, range(max(0, restore.replay_from), plan.resume)))
            finally:
                for store in stores.values():
                    store.close()
            events.update(replayed=report.iterations_replayed if report else 0, replay_s=report.seconds if report else 0.0)
            if engine.upstream is not None:
                engine.upstream.kept_from = restore.replay_from
        engine.iteration = plan.resume
        if engine.checkpointer is not None:
            engine.checkpointer.adopt_schedule(start=plan.window_start, window=plan.window, resume=plan.resume,
                                               restored_start=restore.start)
        log.warning("restored stage %d from %s (window %d) to iteration %d", engine.stage, restore.source,
                    restore.start, plan.resume)

    def _replay_io(self, restore: Restore, stores: dict[int, LogStore]) -> tuple[LogReader, Any]:
        """Where replay reads what the neighbours sent and where what it computes goes: logs and this
        stage's own log, or, inside a chain of lost stages, live links to the chain's other members."""
        engine = self.engine
        if restore.chain_prev is None and restore.chain_next is None:
            return LogReader(stores, stage=engine.stage), engine.upstream
        links = StageLinks(prev_rank=restore.chain_prev, next_rank=restore.chain_next,
                           timeout_s=self.timeout_s, device=engine.dist.device)
        return ChainReader(stores, stage=engine.stage, links=links), ChainRecorder(engine.upstream, links)

    def _load_window(self, restore: Restore) -> WindowImage | None:
        if restore.source == "shm":
            return self._shm_image  # the window this rank announced, already verified
        if restore.source == "peer":
            image = transfer.recv_window(restore.donor)
            if image is None or image.manifest.start_iteration != restore.start:
                raise PeerFailure(f"rank {restore.donor} no longer holds window {restore.start}")
            return image
        if restore.source == "disk":
            return load_persisted(self._persist_root(), stage=self.engine.stage, replica=self.engine.dist.replica,
                                  iteration=restore.start)
        return None

    def _receive_logs(self, restore: Restore) -> tuple[dict[int, LogStore], int]:
        topology, stores, received = self.engine.dist.topology, {}, 0
        try:
            for source in restore.log_sources:
                data = transfer.recv_bytes(source, timeout_s=self.timeout_s, what="upstream logs")
                received += len(data)
                store = stores[topology.stage_of(source)] = LogStore()
                store.import_(data)
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        return stores, received

    def _shm_start(self) -> int:
        ckpt = self.engine.checkpointer
        if ckpt is None:
            return -1
        try:
            self._shm_image = ckpt.shm.load_complete()
        except SnapshotError as error:
            log.info("no usable window in shared memory: %s", error)
            return -1
        return self._shm_image.manifest.start_iteration

    def _disk_start(self) -> int:
        root = self._persist_root()
        if root is None or not root.exists():
            return -1
        mine = [w.start_iteration for w in list_persisted(root)
                if (w.stage, w.replica) == (self.engine.stage, self.engine.dist.replica)]
        return max(mine, default=-1)

    def _persist_root(self) -> Path | None:
        settings = self.engine.config.snapshot
        return Path(settings.persist_dir) / run_id(settings) if settings.persist_dir else None


def _logged_scalars(reader: LogReader, iterations: range) -> dict[int, IterationScalars]:
    """The replayed iterations' logged decisions and losses (replay has read each of them already)."""
    found = {}
    for t in iterations:
        try:
            found[t] = reader.scalars(t)
        except MoetionError:
            continue
    return found
