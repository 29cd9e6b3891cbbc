"""A recovery's phases, from the supervisor's record and what each rank reported (wall-clock seconds).

kill -> detected (the supervisor saw the death) -> every survivor paused (abandoned its wait) -> respawned -> replacement in the group (process
start, model build, group rebuilt with the survivors) -> the script calls ``train_batch`` (it
builds its data first) -> window loaded -> logs received -> replayed -> everyone resumed. Survivors lose no committed iteration by construction; the report counts it
anyway, from what they said they had committed and where the job resumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moetion.recovery.records import Role
from moetion.supervisor import RecoveryRecord


@dataclass
class Timeline:
    generation: int
    ranks: list[int]
    sources: dict[int, str]
    detect_s: float | None
    paused_s: float | None  # kill (or detection) to the last survivor abandoning its in-flight wait
    respawn_s: float
    rejoin_s: float | None
    script_s: float | None
    load_s: float | None
    logs_s: float | None
    log_bytes: int
    replay_s: float
    replayed_stage_iterations: int
    total_s: float | None  # kill (or detection) to every rank resumed
    survivor_lost_iterations: int
    superseded: bool  # a later failure interrupted this generation's recovery
    kinds: dict[int, str]  # how each replacement started: forked, fresh (interpreter) or spare (warm)
    # Survivors replaying with a lost expert-parallel rank (its experts had no other copy) re-execute
    # the window's iterations from their own snapshot; their committed state is never lost.
    survivor_replayed_iterations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def lines(self) -> list[str]:
        if self.superseded:
            return [f"generation {self.generation}: rank(s) {self.ranks} replaced; interrupted by a further failure"]
        sources = ", ".join(f"rank {r} ({self.kinds.get(r, '?')}) from {s}" for r, s in sorted(self.sources.items()))
        out = [f"generation {self.generation}: rank(s) {self.ranks} replaced ({sources})"]
        phases = [("detected", self.detect_s), ("all survivors paused", self.paused_s), ("respawned", self.respawn_s), ("rejoined the group", self.rejoin_s),
                  ("script reached train_batch", self.script_s), ("window loaded", self.load_s), (f"logs received ({self.log_bytes / 2**20:.1f} MiB)", self.logs_s),
                  (f"replayed {self.replayed_stage_iterations} stage-iteration(s)", self.replay_s)]
        out += [f"  {name:<34} {seconds * 1000:8.0f} ms" for name, seconds in phases if seconds is not None]
        if self.total_s is not None:
            out.append(f"  {'kill -> all ranks resumed':<34} {self.total_s * 1000:8.0f} ms")
        out.append(f"  iterations lost by survivors: {self.survivor_lost_iterations}")
        if self.survivor_replayed_iterations:
            out.append(f"  stage-iterations survivors replayed with it (expert parallelism): "
                       f"{self.survivor_replayed_iterations}")
        return out


def timeline(recovery: RecoveryRecord) -> Timeline:
    events = recovery.rank_events
    replacements = {r: e for r, e in events.items() if e.role is Role.REPLACEMENT}
    survivors = {r: e for r, e in events.items() if e.role is Role.SURVIVOR}
    start = recovery.killed_at if recovery.killed_at is not None else recovery.detected_at
    paused = max((e.detected_at - start for e in survivors.values() if e.detected_at is not None), default=None)
    if not replacements:
        return Timeline(recovery.generation, recovery.ranks, {}, _since(recovery.killed_at, recovery.detected_at), paused,
                        recovery.respawned_at - recovery.detected_at, None, None, None, None, 0, 0.0, 0, None, 0, True,
                        recovery.kinds)
    joined = max(e.joined_at for e in replacements.values())
    restore = max(e.restore_at for e in replacements.values())
    loaded = max(e.state_loaded_at for e in replacements.values())
    received = max(e.logs_received_at for e in replacements.values())
    resumed = max(e.resumed_at for e in events.values())
    resume = next(iter(replacements.values())).resume
    return Timeline(
        generation=recovery.generation,
        ranks=recovery.ranks,
        sources={r: e.source.value for r, e in replacements.items()},
        detect_s=_since(recovery.killed_at, recovery.detected_at),
        paused_s=paused,
        respawn_s=recovery.respawned_at - recovery.detected_at,
        rejoin_s=joined - recovery.respawned_at,
        script_s=restore - joined,
        load_s=loaded - restore,
        logs_s=received - loaded,
        log_bytes=sum(e.bytes_received for e in replacements.values()),
        replay_s=max(e.replay_s for e in replacements.values()),
        replayed_stage_iterations=sum(e.replayed for e in replacements.values()),
        total_s=resumed - start,
        survivor_lost_iterations=sum(max(0, e.iteration - resume) for e in survivors.values()),
        superseded=False,
        kinds=recovery.kinds,
        survivor_replayed_iterations=sum(e.replayed for e in survivors.values()),
    )


def _since(start: float | None, end: float) -> float | None:
    return None if start is None else end - start
