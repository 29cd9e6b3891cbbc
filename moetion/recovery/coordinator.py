"""Localized recovery, one rank's side: survivors pause in place, a replacement restores and rejoins.

A survivor that loses a peer (a failed or timed-out send, receive or collective) abandons the
in-flight iteration (its committed state is untouched: the optimizer step is the commit point),
leaves the broken process group, and waits for the supervisor's next generation. A replacement
starts in that generation. Then, in the new group, every rank:

1. all-gathers its :class:`~moetion.recovery.plan.RankStatus` and computes the same
   :class:`~moetion.recovery.plan.RecoveryPlan` (resume iteration, a tier per lost rank);
2. survivors send what the plan asks of them (logs, a window replica, a replica's state);
   a restoring rank loads its window, receives the logs and replays up to the resume iteration
   through the same iteration body as training;
3. waits until every restoring rank is ready, then trains on. Survivors never re-execute anything,
   except the replicas of a stage whose lost experts have no live copy (expert parallelism): they
   reload their own window and replay with the replacement, the all-to-all live among them.

Adjacent stages lost together replay as a chain: each member's replay sends what it computes live
to the members beside it (the links of the chain) and reads the surviving neighbours' logs at the
chain's ends, through the same boundary ports that training uses.

A failure during any of this (the replacement dies mid-replay) just starts the next generation.
The stage is seen only through :class:`~moetion.recovery.stage.RecoverableStage`.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from logging_store import LogStore

from moetion import failure_notice
from moetion.boundary import BoundaryInputs, BoundaryOutputs
from moetion.control import ControlPlane, JobAborted
from moetion.data import DataSource
from moetion.errors import PeerFailure
from moetion.faults import fault_point, faults_armed
from moetion.p2p import StageLinks
from moetion.recovery import transfer
from moetion.recovery.plan import RankStatus, RecoveryImpossible, RecoveryPlan, Restore, plan_recovery
from moetion.recovery.records import RecoveryEvents, RestoreSource, Role
from moetion.recovery.stage import RecoverableStage
from moetion.snapshot.image import WindowImage
from moetion.snapshot.persist import list_persisted, load_persisted
from moetion.upstream_log import LogReader

log = logging.getLogger(__name__)


class Recovery:
    """Drives one rank through recoveries; owned by its engine."""

    def __init__(self, stage: RecoverableStage, control: ControlPlane, *, generation: int, needs_restore: bool,
                 timeout_s: float) -> None:
        self.stage, self.control = stage, control
        self.generation = generation
        self.needs_restore = needs_restore
        self.timeout_s = timeout_s
        self._held: WindowImage | None = None
        self._shm_image: WindowImage | None = None
        self._finished = False
        self.started_at = time.time()  # the engine was made right after joining the group

    # -- entry points ----------------------------------------------------------------------------
    def after_failure(self, cause: str, data: DataSource) -> None:
        """A survivor lost a peer in the middle of an iteration: pause in place, rebuild, go on."""
        now = time.time()
        notice = failure_notice.received()
        events = RecoveryEvents(Role.SURVIVOR, cause=cause, iteration=self.stage.iteration, detected_at=now,
                                inflight_s=now - self.stage.in_flight_since(),
                                notice_generation=None if notice is None else notice.published,
                                noticed_at=None if notice is None else notice.at)
        log.warning("%s; pausing in place until the job is rebuilt", cause.split(": [")[0])
        self.stage.abandon_iteration()
        self.stage.leave_group()
        self._fault_point("paused")
        self._rebuild(data, events, joined=False)

    def restore(self, data: DataSource) -> RecoveryPlan:
        """A replacement's first act, in the generation it was started into; returns the plan it
        restored under (``plan.finished``: the job had already finished training)."""
        events = RecoveryEvents(Role.REPLACEMENT, joined_at=self.started_at, restore_at=time.time())
        return self._rebuild(data, events, joined=True)

    def finish(self) -> None:
        """Before closing: wait until every rank has finished. A rank lost after the last commit is
        still replaced and restored (its final state is part of the result), with the finished
        survivors serving its restore."""
        rank, world = self.stage.seat().rank, self.stage.seat().topology.world_size
        self._finished = True
        self.control.mark_done(self.generation, rank)
        while not self.control.wait_done(self.generation, world, timeout_s=self.timeout_s):
            events = RecoveryEvents(Role.SURVIVOR, cause="finished; a rank was lost", iteration=self.stage.iteration,
                                    detected_at=time.time())
            self.stage.leave_group()
            self._rebuild(None, events, joined=False)
            self.control.mark_done(self.generation, rank)

    # -- the generation loop ---------------------------------------------------------------------
    def _rebuild(self, data: DataSource | None, events: RecoveryEvents, *, joined: bool) -> RecoveryPlan:
        while True:
            if not joined:
                self.generation = self.control.wait_for_generation_after(self.generation, timeout_s=self.timeout_s)
                if not self.stage.join_group(self.control, self.generation):
                    continue
                events.joined_at = time.time()
                if self.needs_restore:
                    events.restore_at = events.joined_at
            joined = False
            failure = None
            try:
                plan = self._handoff(data, events)
            except PeerFailure as error:
                failure = str(error)
            if failure is None:
                events.resumed_at = time.time()
                self.control.record(self.generation, self.stage.seat().rank, events)
                self.stage.recovered(self.generation, events)
                return plan
            log.warning("generation %d failed during recovery (%s); waiting for the next", self.generation, failure)
            events.retries.append(failure)
            self.stage.leave_group()

    def _handoff(self, data: DataSource | None, events: RecoveryEvents) -> RecoveryPlan:
        plan = self._agree()
        events.resume = plan.resume
        rank = self.stage.seat().rank
        mine = plan.restore_of(rank)
        if mine is None:
            events.bytes_sent = self._serve(plan)
        else:  # a replacement, or a survivor replaying with its stage's expert-parallel replicas
            self._restore(plan, mine, data, events)
            self.needs_restore = False
            self.control.mark_ready(self.generation, rank)
            events.ready_at = time.time()
        if not self.control.wait_ready(self.generation, plan.restoring_ranks, timeout_s=self.timeout_s):
            raise PeerFailure(f"a rank failed while generation {self.generation} was restoring")
        return plan

    def _agree(self) -> RecoveryPlan:
        mine = self._status().to_tensor()
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        try:
            dist.all_gather(gathered, mine)
        except RuntimeError as error:
            raise PeerFailure(failure_notice.explain(f"exchanging recovery status: {str(error).splitlines()[0]}")) from None
        statuses = [RankStatus.from_tensor(t) for t in gathered]
        seat = self.stage.seat()
        try:
            return plan_recovery(statuses, topology=seat.topology, tied_stages=seat.tied_stages)
        except RecoveryImpossible as error:
            self.control.declare_fatal(str(error))
            raise JobAborted(str(error)) from None

    def _status(self) -> RankStatus:
        stage = self.stage
        if self.needs_restore:
            self._shm_image = stage.shm_window()
            kept = stage.held_starts()
            return RankStatus(None, True, shm_start=_start_of(self._shm_image), disk_start=self._disk_start(),
                              shm_oldest=next((s for s in kept if s >= 0), None))
        self._held = stage.held_replica()  # the replica announced; a newer one may arrive before it is sent
        start, window = stage.window_schedule()
        return RankStatus(stage.iteration, False, held_start=_start_of(self._held),
                          window_start=None if start < 0 else start, window=window,
                          log_kept_from=stage.logs_kept_from(), finished=self._finished,
                          own_start=stage.own_window_start(), own_oldest=next(iter(stage.held_starts()), None))

    # -- survivors -----------------------------------------------------------------------------------
    def _serve(self, plan: RecoveryPlan) -> int:
        """Sends, in the plan's order, what this survivor owes the restoring ranks; returns bytes sent."""
        rank, sent = self.stage.seat().rank, 0
        for restore in plan.restores:
            if restore.donor == rank and restore.source is RestoreSource.REPLICA:
                transfer.send_state(self.stage.state(), restore.rank)
            elif restore.donor == rank and restore.source is RestoreSource.PEER:
                transfer.send_window(self._held, restore.rank)
                sent += self._held.manifest.blob_bytes
            if rank in restore.log_sources:
                logs = self.stage.export_logs(restore.replay_from, plan.resume)
                transfer.send_bytes(logs, restore.rank, what="upstream logs",
                                    after_size=lambda: self._fault_point("handover"))
                sent += len(logs)
            if rank == plan.history_donor and not restore.survivor:
                transfer.send_losses(self.stage.loss_history(), restore.rank)
        # The replica a replacement held for us died with its predecessor: send our window again.
        self.stage.reoffer_window(plan.replaced_ranks)
        return sent

    def _fault_point(self, phase: str) -> None:
        if faults_armed():
            seat = self.stage.seat()
            fault_point(phase, stage=seat.stage, replica=seat.replica, iteration=self.stage.iteration)

    # -- the restoring rank ----------------------------------------------------------------------------
    def _restore(self, plan: RecoveryPlan, restore: Restore, data: DataSource, events: RecoveryEvents) -> None:
        events.source = restore.source
        if restore.source is RestoreSource.REPLICA:
            state, events.window_bytes = transfer.recv_state(restore.donor, timeout_s=self.timeout_s)
            self._receive_losses(plan)
            self.stage.load_state(state, resume=plan.resume)
            events.state_loaded_at = events.logs_received_at = time.time()
        else:
            image = self._load_window(restore)
            events.state_loaded_at = time.time()
            events.window_bytes = image.manifest.blob_bytes if image is not None else 0
            stores, events.bytes_received = self._receive_logs(restore)
            events.logs_received_at = time.time()
            try:
                if not restore.survivor:  # a survivor keeps its own loss history
                    self._receive_losses(plan)
                reader = LogReader(stores, stage=self.stage.seat().stage, device=self.stage.seat().device)
                inputs, outputs = self._chain_ports(restore, reader)
                report = self.stage.replay(image, reader, data, resume=plan.resume, inputs=inputs, outputs=outputs,
                                           together=bool(restore.together), survivor=restore.survivor)
            finally:
                for store in stores.values():
                    store.close()
            if report is not None:
                events.replayed, events.replay_s = report.iterations_replayed, report.seconds
        if not restore.survivor:  # a survivor's own windows go on as before
            self.stage.adopt_schedule(start=plan.window_start, window=plan.window, resume=plan.resume,
                                      restored_start=restore.start)
        log.warning("restored stage %d from %s (window %d) to iteration %d", self.stage.seat().stage,
                    restore.source.value, restore.start, plan.resume)

    def _receive_losses(self, plan: RecoveryPlan) -> None:
        """The job's loss history, received in the donor's send order (after its logs, before any
        replay: members of a chain replay together, so none may wait on a send that waits on it)."""
        self.stage.adopt_losses(transfer.recv_losses(plan.history_donor, timeout_s=self.timeout_s))

    def _chain_ports(self, restore: Restore, reader: LogReader) -> tuple[BoundaryInputs | None, BoundaryOutputs | None]:
        """Inside a chain of lost stages, replay talks live to the members beside it; else the
        default ports (the logs in, the stage's own log out) serve."""
        if restore.chain_prev is None and restore.chain_next is None:
            return None, None
        seat = self.stage.seat()
        links = StageLinks(prev_rank=restore.chain_prev, next_rank=restore.chain_next,
                           timeout_s=self.timeout_s, device=seat.device)
        where = f"chain replay of stage {seat.stage}"
        return BoundaryInputs(links, reader, where=where), BoundaryOutputs(links, self.stage.recorder(), where=where)

    def _load_window(self, restore: Restore) -> WindowImage | None:
        seat = self.stage.seat()
        if restore.survivor and restore.start < 0:
            self.stage.reset_to_initial()
            return None
        if restore.survivor or (restore.source is RestoreSource.SHM and restore.start != _start_of(self._shm_image)):
            image = self.stage.shm_window(restore.start)  # a window kept for a replay with the stage's replicas
            if image is None or image.manifest.start_iteration != restore.start:
                raise PeerFailure(f"rank {seat.rank} no longer holds its window {restore.start} in shared memory")
            return image
        if restore.source is RestoreSource.SHM:
            return self._shm_image  # the window this rank announced, already verified
        if restore.source is RestoreSource.PEER:
            image = transfer.recv_window(restore.donor)
            if image is None or image.manifest.start_iteration != restore.start:
                raise PeerFailure(f"rank {restore.donor} no longer holds window {restore.start}")
            return image
        if restore.source is RestoreSource.DISK:
            return load_persisted(self.stage.persist_root(), stage=seat.stage, replica=seat.replica,
                                  iteration=restore.start)
        return None

    def _receive_logs(self, restore: Restore) -> tuple[dict[int, LogStore], int]:
        topology, stores, received = self.stage.seat().topology, {}, 0
        try:
            for source in restore.log_sources:
                data = transfer.recv_bytes(source, timeout_s=self.timeout_s, what="upstream logs")
                received += len(data)
                store = stores[topology.stage_of(source)] = LogStore(self.stage.received_log_config())  # its budget
                store.import_(data)
        except BaseException:
            for store in stores.values():
                store.close()
            raise
        return stores, received

    def _disk_start(self) -> int | None:
        root, seat = self.stage.persist_root(), self.stage.seat()
        if root is None or not root.exists():
            return None
        mine = [w.start_iteration for w in list_persisted(root) if (w.stage, w.replica) == (seat.stage, seat.replica)]
        return max(mine, default=None)


def _start_of(image: WindowImage | None) -> int | None:
    return None if image is None else image.manifest.start_iteration
