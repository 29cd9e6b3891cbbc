"""Who restores how after a failure: a pure function of what every rank reports.

Every rank of the rebuilt job contributes one :class:`RankStatus` to an all-gather and computes
the same :class:`RecoveryPlan` from the gathered table, so no rank decides for the others and no
extra round is needed. The tiers, fastest first (DESIGN.md §4): a live data-parallel replica of the
lost stage holding the same experts (copy its state), the replacement's own shared memory, the peer that holds its window
replica, disk; before any window completed, the initial state. A window tier is usable only when
every neighbour still logs what replay needs from it.

Adjacent stages lost together (their logs of each other died with them) replay as a chain from a
window start that every member holds in some tier: the chain's ends read the surviving
neighbours' logs, and inside the chain each member sends what it computes to the next one live.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch

from moetion.errors import MoetionError
from moetion.recovery.records import RestoreSource
from moetion.snapshot.replica import replication_peers
from moetion.topology import PipeTopology

_NONE = -(2 ** 62)  # how "nothing" travels in the all-gathered integer row (-1 is the initial state)


class RecoveryImpossible(MoetionError):
    """No tier holds what an exact recovery needs; the message names what is missing."""


@dataclass(frozen=True)
class RankStatus:
    """What one rank brings to a recovery (None: nothing, or not applicable)."""

    iteration: int | None  # next iteration a survivor runs; None for a rank that needs restoring
    needs_restore: bool
    shm_start: int | None = None  # restoring rank: its newest intact window in node-local shared memory
    held_start: int | None = None  # survivor: the window replica it holds for the rank it receives from
    window_start: int | None = None  # survivor: the window in progress (the job's schedule)
    window: int = 0
    log_kept_from: int | None = None  # survivor: every iteration from here on is in its upstream log
    disk_start: int | None = None  # restoring rank: its newest persisted window
    finished: bool = False  # survivor: it has finished training and waits in close()
    own_start: int | None = None  # survivor: its own newest complete window (expert-parallel group replay)
    own_oldest: int | None = None  # survivor: the oldest window it keeps for a group replay (-1: the initial state)
    shm_oldest: int | None = None  # restoring rank: the oldest window kept in its shared memory

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([_NONE if v is None else int(v) for v in astuple(self)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "RankStatus":
        raw = values.tolist()
        kwargs = {f.name: (None if raw[i] == _NONE else raw[i]) for i, f in enumerate(fields(cls))}
        for flag in ("needs_restore", "finished"):
            kwargs[flag] = bool(kwargs[flag])
        kwargs["window"] = kwargs["window"] or 0
        return cls(**kwargs)


@dataclass(frozen=True)
class Restore:
    """How one rank gets back to the survivors' iteration."""

    rank: int
    source: RestoreSource
    start: int  # the window's first iteration (-1: the initial state, or a replica's state)
    donor: int | None  # the rank sending its state ("replica") or the window replica ("peer")
    log_sources: tuple[int, ...]  # ranks that send their logs, in this order
    # Adjacent stages lost together replay as a chain: what a neighbour in the chain would have
    # logged, it computes and sends live during the replay.
    chain_prev: int | None = None
    chain_next: int | None = None
    # A stage whose lost experts have no live copy replays with all its replicas at once, the
    # all-to-all and the gradient average live among them: the ranks, and whether this one survived
    # (it replays from its own window, keeps its logs and loss history, and serves nothing).
    together: tuple[int, ...] = ()
    survivor: bool = False

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
    finished: bool = False  # every survivor had finished training: restore, then only close
    history_donor: int | None = None  # the survivor that sends every restoring rank the job's loss history

    def restore_of(self, rank: int) -> Restore | None:
        return next((r for r in self.restores if r.rank == rank), None)

    @property
    def restoring_ranks(self) -> list[int]:
        """Every rank that restores or replays (the others wait until these are ready)."""
        return [r.rank for r in self.restores]

    @property
    def replaced_ranks(self) -> list[int]:
        """The restoring ranks that lost their state (replacements), not survivors replaying with them."""
        return [r.rank for r in self.restores if not r.survivor]


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
    restores: list[Restore] = []
    grouped = _stages_replaying_together(restoring, survivors, topology)
    for chain in _chains(restoring, topology):
        if any(topology.stage_of(rank) in grouped for rank in chain):
            if len(chain) > 1:
                raise RecoveryImpossible(
                    f"ranks {chain} of adjacent stages were lost together and one of them must replay with its "
                    "expert-parallel group: not supported; restart the job from its persisted windows "
                    f"(`moetion launch --resume`){_newest(statuses, chain)}")
            continue
        restores += _restore_chain(chain, statuses, survivors, resume, topology, tied_stages)
    for stage in sorted(grouped):
        restores += _restore_group(stage, statuses, survivors, resume, topology, tied_stages)
    finished = all(statuses[r].finished for r in survivors)
    serving = [r for r in survivors if not any(x.rank == r for x in restores)]
    if not serving:
        raise RecoveryImpossible("every surviving rank must replay with a lost expert-parallel rank: nothing is "
                                 "left to serve the logs; restart the job from its persisted windows")
    return RecoveryPlan(resume, -1 if window_start is None else window_start, window,
                        tuple(sorted(restores, key=lambda r: r.rank)), finished, history_donor=min(serving))


def _stages_replaying_together(restoring: list[int], survivors: list[int], topology: PipeTopology) -> set[int]:
    """Stages with a lost rank whose experts no survivor holds: all their replicas replay together."""
    if topology.expert_parallel == 1:
        return set()
    return {topology.stage_of(rank) for rank in restoring if _copy_of_live_replica(rank, topology, survivors) is None}


def _restore_group(stage: int, statuses: list[RankStatus], survivors: list[int], resume: int,
                   topology: PipeTopology, tied_stages: dict[str, list[int]]) -> list[Restore]:
    """Option (a) of expert-parallel recovery: every replica of ``stage`` replays from a window start
    all of them hold (survivors: their own newest window in shared memory, or the oldest they keep
    for their group, or the initial state), each reading its own pipeline neighbours' logs, with the
    all-to-all and the gradient average live among them."""
    members = topology.replica_ranks(stage)
    lost = [r for r in members if r not in survivors]
    what = f"stage {stage} (ranks {members}, expert-parallel groups of {topology.expert_parallel})"
    talks = {r: _talks_to(r, topology, tied_stages) for r in members}
    gone = sorted({n for ns in talks.values() for n in ns if n not in survivors})
    if gone:
        raise RecoveryImpossible(f"{what} must replay together, but rank(s) {gone}, whose logs it reads, were lost "
                                 f"too; restart the job from its persisted windows{_newest(statuses, lost)}")
    if any(statuses[r].finished for r in members if r in survivors):
        raise RecoveryImpossible(f"{what}: a rank was lost after training finished and its replicas would have to "
                                 "replay without a data source; restart the job from its persisted windows")
    helpers = [r for r in survivors if r not in members]
    tiers = {r: _tiers(r, statuses, helpers, topology) for r in lost}
    for r in members:
        if r in survivors:
            kept = (statuses[r].own_oldest, statuses[r].own_start)
            tiers[r] = {s: (RestoreSource.SHM if s >= 0 else RestoreSource.INITIAL, None) for s in kept if s is not None}
    common = sorted(set.intersection(*(set(t) for t in tiers.values())), reverse=True)
    for start in common:
        needed = range(start + 1, resume)
        if needed and any(statuses[n].log_kept_from is None or statuses[n].log_kept_from > needed.start
                          for ns in talks.values() for n in ns):
            continue
        return [Restore(r, tiers[r][start][0], start, tiers[r][start][1], tuple(talks[r]), together=tuple(members),
                        survivor=r in survivors) for r in members]
    held = "; ".join(f"rank {r}: " + (", ".join(f"window {s}" if s >= 0 else "the initial state" for s in sorted(t))
                                      or "none") for r, t in tiers.items())
    raise RecoveryImpossible(f"{what} must replay together from a window every replica holds (with its "
                             f"neighbours' logs since): {held}{_newest(statuses, lost)}")


def _chains(restoring: list[int], topology: PipeTopology) -> list[list[int]]:
    """Restoring ranks grouped into runs of adjacent stages of one pipeline, in stage order."""
    chains: list[list[int]] = []
    for rank in sorted(restoring, key=lambda r: (topology.replica_of(r), topology.stage_of(r))):
        last = chains[-1][-1] if chains else None
        if (last is not None and topology.replica_of(last) == topology.replica_of(rank)
                and topology.stage_of(last) + 1 == topology.stage_of(rank)):
            chains[-1].append(rank)
        else:
            chains.append([rank])
    return chains


def _restore_chain(chain: list[int], statuses: list[RankStatus], survivors: list[int], resume: int,
                   topology: PipeTopology, tied_stages: dict[str, list[int]]) -> list[Restore]:
    healed = [_copy_of_live_replica(rank, topology, survivors) for rank in chain]
    if all(healed):
        return healed
    first = chain[0]
    stage, replica = topology.stage_of(first), topology.replica_of(first)
    what = (f"rank {first} (stage {stage}, replica {replica})" if len(chain) == 1 else
            f"ranks {chain} (stages {topology.stage_of(first)}..{topology.stage_of(chain[-1])}, replica {replica})")
    if topology.data_parallel > 1:
        raise RecoveryImpossible(
            f"{what}: every data-parallel replica of the stage was lost at once; replicas replay only "
            f"together, so restart the job from its persisted windows (`moetion launch --resume`){_newest(statuses, chain)}")
    members = set(chain)
    talks_to = sorted({r for rank in chain for r in _talks_to(rank, topology, tied_stages)} - members)
    lost = [r for r in talks_to if r not in survivors]
    if lost:
        raise RecoveryImpossible(
            f"{what}: rank(s) {lost}, whose logs its replay reads (tied weights), were lost with it; restart the "
            f"job from its persisted windows (`moetion launch --resume`){_newest(statuses, chain)}")
    tiers = {rank: _tiers(rank, statuses, survivors, topology) for rank in chain}
    common = sorted(set.intersection(*(set(t) for t in tiers.values())), reverse=True)
    tried = []
    for start in common:
        needed = range(start + 1, resume)
        kept = {r: statuses[r].log_kept_from for r in talks_to}
        if needed and (not talks_to or any(k is None or k > needed.start for k in kept.values())):
            name = "the initial state" if start < 0 else f"window {start}"
            shown = {r: ("nothing (upstream_log is off)" if k is None else k) for r, k in kept.items()}
            tried.append(f"{name} needs logs of iterations {needed.start}..{resume - 1}, "
                         f"surviving neighbours log from {shown or 'nowhere'}")
            continue
        restores = []
        for i, rank in enumerate(chain):
            source, donor = tiers[rank][start]
            restores.append(Restore(rank, source, start, donor, tuple(talks_to),
                                    chain_prev=chain[i - 1] if i > 0 else None,
                                    chain_next=chain[i + 1] if i + 1 < len(chain) else None))
        return restores
    held = "; ".join(f"rank {rank} holds " + ", ".join(
        "the initial state" if start < 0 else f"window {start} ({source.value})"
        for start, (source, _) in sorted(tiers[rank].items(), reverse=True)) for rank in chain)
    raise RecoveryImpossible(f"{what} cannot be restored exactly: {held}; "
                             f"{'; '.join(tried) or 'no window start common to all'}{_newest(statuses, chain)}")


def _copy_of_live_replica(rank: int, topology: PipeTopology, survivors: list[int]) -> Restore | None:
    """A surviving replica of the rank's stage that holds the same experts (any replica without
    expert parallelism), whose state is the lost rank's."""
    same = topology.expert_data_ranks(topology.stage_of(rank), topology.expert_rank_of(rank))
    live = [r for r in same if r in survivors]
    return Restore(rank, RestoreSource.REPLICA, -1, live[0], ()) if live else None


def _tiers(rank: int, statuses: list[RankStatus], survivors: list[int],
           topology: PipeTopology) -> dict[int, tuple[RestoreSource, int | None]]:
    """Window start -> (tier, donor) this rank can restore from, the fastest tier for each start."""
    found: dict[int, tuple[RestoreSource, int | None]] = {-1: (RestoreSource.INITIAL, None)}
    mine = statuses[rank]
    if mine.disk_start is not None:
        found[mine.disk_start] = (RestoreSource.DISK, None)
    holder = next((r for r in survivors if statuses[r].held_start is not None
                   and (replication_peers(topology, r) or (None, None))[1] == rank), None)
    if holder is not None:
        found[statuses[holder].held_start] = (RestoreSource.PEER, holder)
    if mine.shm_oldest is not None:
        found[mine.shm_oldest] = (RestoreSource.SHM, None)
    if mine.shm_start is not None:
        found[mine.shm_start] = (RestoreSource.SHM, None)
    return found


def _talks_to(rank: int, topology: PipeTopology, tied_stages: dict[str, list[int]]) -> list[int]:
    """Ranks whose logs a replay of this rank's stage reads: its neighbours, and stages sharing its tied weights."""
    stage, replica = topology.stage_of(rank), topology.replica_of(rank)
    stages = {stage - 1, stage + 1} | {s for shared in tied_stages.values() if stage in shared for s in shared}
    return sorted(topology.rank(stage=s, replica=replica) for s in stages
                  if 0 <= s < topology.num_stages and s != stage)


def _newest(statuses: list[RankStatus], ranks: list[int]) -> str:
    persisted = [statuses[r].disk_start for r in ranks]
    if all(p is not None for p in persisted):
        return f"; the newest window persisted for it starts at iteration {min(persisted)}"
    return "; no window of it was persisted (set snapshot.persist_dir to allow a restart)"
