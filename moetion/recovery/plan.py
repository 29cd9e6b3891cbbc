"""Who restores how after a failure: a pure function of what every rank reports.

Every rank of the rebuilt job contributes one :class:`RankStatus` to an all-gather and computes
the same :class:`RecoveryPlan` from the gathered table, so no rank decides for the others and no
extra round is needed. The tiers, fastest first (DESIGN.md §4): a live data-parallel replica of the
lost stage (copy its state), the replacement's own shared memory, the peer that holds its window
replica, disk; before any window completed, the initial state. A window tier is usable only when
every neighbour still logs what replay needs from it.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch

from moetion.errors import MoetionError
from moetion.snapshot.replica import replication_peers
from moetion.topology import PipeTopology

NOT_LOGGING = 2**40  # log_kept_from of a rank without upstream logging: it can serve no replay


class RecoveryImpossible(MoetionError):
    """No tier holds what an exact recovery needs; the message names what is missing."""


@dataclass(frozen=True)
class RankStatus:
    """What one rank brings to a recovery (-1: nothing / not applicable)."""

    iteration: int  # next iteration a survivor runs; -1 for a rank that needs restoring
    needs_restore: bool
    shm_start: int = -1  # restoring rank: its newest intact window in node-local shared memory
    held_start: int = -1  # survivor: the window replica it holds for the rank it receives from
    window_start: int = -1  # survivor: the window in progress (the job's schedule)
    window: int = 0
    log_kept_from: int = NOT_LOGGING  # survivor: every iteration from here on is in its upstream log
    disk_start: int = -1  # restoring rank: its newest persisted window

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([int(v) for v in astuple(self)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "RankStatus":
        raw = values.tolist()
        kwargs = {f.name: raw[i] for i, f in enumerate(fields(cls))}
        kwargs["needs_restore"] = bool(kwargs["needs_restore"])
        return cls(**kwargs)

    @classmethod
    def width(cls) -> int:
        return len(fields(cls))


@dataclass(frozen=True)
class Restore:
    """How one rank gets back to the survivors' iteration."""

    rank: int
    source: str  # "replica" | "shm" | "peer" | "disk" | "initial"
    start: int  # the window's first iteration (-1: the initial state, or a replica's state)
    donor: int | None  # the rank sending its state ("replica") or the window replica ("peer")
    log_sources: tuple[int, ...]  # ranks that send their logs, in this order

    @property
    def replay_from(self) -> int:
        """First iteration replayed: the one after the window's first capture (0 from the initial state)."""
        return self.start + 1


@dataclass(frozen=True)
class RecoveryPlan:
    resume: int  # the iteration every rank runs next
    window_start: int  # the job's window in progress (-1: none yet)
    window: int
    restores: tuple[Restore, ...]

    def restore_of(self, rank: int) -> Restore | None:
        return next((r for r in self.restores if r.rank == rank), None)

    @property
    def restoring_ranks(self) -> list[int]:
        return [r.rank for r in self.restores]


def plan_recovery(statuses: list[RankStatus], *, topology: PipeTopology,
                  tied_stages: dict[str, list[int]]) -> RecoveryPlan:
    """The plan every rank computes from the same gathered statuses (raises RecoveryImpossible)."""
    survivors = [r for r, s in enumerate(statuses) if not s.needs_restore]
    restoring = [r for r, s in enumerate(statuses) if s.needs_restore]
    if not survivors:
        raise RecoveryImpossible(
            "every rank was lost at once: nothing to rejoin; restart the job from its persisted windows "
            "(`moetion launch --resume`)")
    iterations = {statuses[r].iteration for r in survivors}
    if len(iterations) != 1:
        at = {r: statuses[r].iteration for r in survivors}
        raise RecoveryImpossible(f"survivors disagree on the committed iteration {at}: the commit point was torn")
    schedules = {(statuses[r].window_start, statuses[r].window) for r in survivors}
    if len(schedules) != 1:
        raise RecoveryImpossible(f"survivors disagree on the snapshot window in progress: {sorted(schedules)}")
    resume = iterations.pop()
    window_start, window = schedules.pop()
    restores = tuple(_restore_for(rank, statuses, survivors, resume, topology, tied_stages) for rank in restoring)
    return RecoveryPlan(resume, window_start, window, restores)


def _restore_for(rank: int, statuses: list[RankStatus], survivors: list[int], resume: int,
                 topology: PipeTopology, tied_stages: dict[str, list[int]]) -> Restore:
    stage, replica = topology.stage_of(rank), topology.replica_of(rank)
    live_replicas = [r for r in topology.replica_ranks(stage) if r in survivors]
    if live_replicas:
        return Restore(rank, "replica", -1, live_replicas[0], ())
    what = f"rank {rank} (stage {stage}, replica {replica})"
    if topology.data_parallel > 1:
        raise RecoveryImpossible(
            f"{what}: every data-parallel replica of stage {stage} was lost at once; replicas replay only "
            f"together, so restart the job from its persisted windows (`moetion launch --resume`){_newest(statuses[rank])}")
    talks_to = _talks_to(stage, replica, topology, tied_stages)
    lost = [r for r in talks_to if r not in survivors]
    if lost:
        raise RecoveryImpossible(
            f"{what} and its neighbour(s) {lost} were lost together: the upstream logs each needs died with the "
            f"other; restart the job from its persisted windows (`moetion launch --resume`){_newest(statuses[rank])}")
    mine = statuses[rank]
    holder = next((r for r in survivors if replication_peers(topology, r) and replication_peers(topology, r)[1] == rank
                   and statuses[r].held_start >= 0), None)
    candidates = [("shm", mine.shm_start, None)]
    if holder is not None:
        candidates.append(("peer", statuses[holder].held_start, holder))
    candidates += [("disk", mine.disk_start, None), ("initial", -1, None)]
    tried = []
    for source, start, donor in candidates:
        if source != "initial" and start < 0:
            tried.append(f"{source}: none")
            continue
        needed = range(start + 1, resume)
        short = [r for r in talks_to if statuses[r].log_kept_from > needed.start]
        if needed and (not talks_to or short):
            kept = {r: statuses[r].log_kept_from for r in talks_to}
            what_needs = "the initial state" if source == "initial" else f"window {start}"
            tried.append(f"{source}: {what_needs} needs logs of iterations {needed.start}..{resume - 1}, "
                         f"neighbours log from {kept or 'nowhere'}")
            continue
        return Restore(rank, source, start, donor, tuple(talks_to))
    raise RecoveryImpossible(f"{what} cannot be restored exactly: {'; '.join(tried)}{_newest(mine)}")


def _talks_to(stage: int, replica: int, topology: PipeTopology, tied_stages: dict[str, list[int]]) -> list[int]:
    """Ranks whose logs a replay of this stage reads: its neighbours, and stages sharing its tied weights."""
    stages = {stage - 1, stage + 1} | {s for shared in tied_stages.values() if stage in shared for s in shared}
    return sorted(topology.rank(stage=s, replica=replica) for s in stages
                  if 0 <= s < topology.num_stages and s != stage)


def _newest(status: RankStatus) -> str:
    if status.disk_start >= 0:
        return f"; the newest window persisted for it starts at iteration {status.disk_start}"
    return "; no window of it was persisted (set snapshot.persist_dir to allow a restart)"
