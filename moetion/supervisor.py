"""The supervisor: watches a host's ranks, replaces the ones that die, and ends the job when it must.

One supervisor per host (they share the job's control store; see :mod:`moetion.control`). Policy:

- a rank killed by a signal (SIGKILL, a crash, an OOM kill) is an infrastructure fault: with
  ``recover`` on, the supervisor starts a replacement with the same rank and publishes a new
  generation, which the survivors join (they keep their state; see :mod:`moetion.recovery`);
- a rank whose heartbeat stops for ``heartbeat_timeout_s`` while its process lives is hung: it
  is SIGKILLed, and then replaced like any other dead rank;
- a survivor that has not rejoined a new generation ``rejoin_timeout_s`` after it was published is
  named in a warning: its failure notice breaks every wait on its groups within milliseconds, so it
  is stuck where no notice reaches (a gloo send whose connection closed mid-write). It is not
  killed: its state may be the only one its stage's recovery can use, which the supervisor cannot
  tell; its own wait ends at ``peer_timeout_s``;
- a rank that exits with an error (an exception: a bug, bad input) is not retried: the others get
  ``grace_s`` to exit, then are killed, and the job fails naming every rank's error, root causes
  first. So does a ``fatal`` message in the control store (nothing can recover exactly), and so
  does exceeding ``max_restarts``.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.distributed as dist

from moetion import tensor_tree
from moetion.control import ControlPlane
from moetion.errors import LaunchError, MoetionError
from moetion.faults import read_fault_log
from moetion.hosts import HostWatch
from moetion.recovery.records import RecoveryEvents

REJOIN_TIMEOUT_S = 30.0  # a survivor still not in a new generation this long after it appeared is named as stuck
GRACE_S = 10.0  # how long survivors get to exit on their own after a rank fails for good
POLL_S = 0.02
LOOK_EVERY_S = 1.0  # how often the store is asked about heartbeats and rejoins (not every poll)
SETTLE_S = 0.05  # after a death, wait this long for others dying with it: one generation for all


@dataclass
class Worker:
    """One rank's process, and what it reported."""

    rank: int
    handle: subprocess.Popen | mp.process.BaseProcess
    result_pipe: Connection | None = None
    result: Any = None
    error: str | None = None
    exited_at: float = float("inf")
    kind: str = "forked"  # how it started: "forked", "fresh" (a new interpreter) or "spare" (a warm spare)

    def exit_code(self) -> int | None:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll()
        return self.handle.exitcode

    def kill(self) -> None:
        if self.exit_code() is None:
            self.handle.kill()

    def collect(self) -> None:
        """Reads the function result or formatted exception a forked worker sent, if any."""
        if self.result_pipe is None or not self.result_pipe.poll():
            return
        try:
            data = self.result_pipe.recv_bytes()
        except EOFError:  # the worker died without reporting; its exit code tells how
            self.result_pipe = None
            return
        try:
            status, payload = tensor_tree.decode(bytearray(data), source=f"the result of worker {self.rank}")
        except (MoetionError, ValueError) as error:  # a torn or foreign message: report it as the worker's error
            status, payload = "error", str(error)
        if status == "ok":
            self.result = payload
        else:
            self.error = payload

    def reap(self) -> None:
        self.collect()
        if isinstance(self.handle, mp.process.BaseProcess):
            self.handle.join()


Spawn = Callable[[int, int, int], Worker]  # (rank, generation, control store port) -> a started worker


@dataclass
class RecoveryRecord:
    """One failure and the generation that replaced it, as the supervisor saw it (wall-clock times)."""

    generation: int
    ranks: list[int]
    causes: dict[int, str]
    detected_at: float
    respawned_at: float
    killed_at: float | None = None
    kinds: dict[int, str] = field(default_factory=dict)  # replacement rank -> how it started (Worker.kind)
    rank_events: dict[int, RecoveryEvents] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "ranks": self.ranks, "causes": self.causes,
                "killed_at": self.killed_at, "detected_at": self.detected_at, "respawned_at": self.respawned_at,
                "kinds": self.kinds, "rank_events": {r: asdict(e) for r, e in self.rank_events.items()}}


@dataclass
class JobReport:
    """What a supervised job returned: each rank's result (forked workers) and every recovery."""

    results: list[Any]
    recoveries: list[RecoveryRecord]


class Supervisor:
    """Runs this host's ranks (``ranks``, global numbers; all of them by default) made by ``spawn``
    until they all exit. Supervisors of other hosts share ``control``: a generation one of them
    publishes is joined by every rank, and a job failure on one host ends the others' too."""

    def __init__(
        self,
        spawn: Spawn,
        *,
        world_size: int,
        control: ControlPlane,
        ranks: Sequence[int] | None = None,
        recover: bool = False,
        max_restarts: int = 8,
        heartbeat_timeout_s: float = 30.0,
        rejoin_timeout_s: float = REJOIN_TIMEOUT_S,
        timeout_s: float | None = None,
        grace_s: float = GRACE_S,
        fault_log: Path | None = None,
        hosts: HostWatch | None = None,
        first_generation: int = 0,
    ) -> None:
        self.spawn, self.world_size, self.control = spawn, world_size, control
        self.ranks = list(range(world_size) if ranks is None else ranks)
        self.recover, self.max_restarts = recover, max_restarts
        self.heartbeat_timeout_s, self.timeout_s, self.grace_s = heartbeat_timeout_s, timeout_s, grace_s
        self.rejoin_timeout_s = rejoin_timeout_s
        self.fault_log = fault_log
        self.hosts = hosts  # the other hosts' liveness, in a multi-host job
        self.store_lost = False
        self.generation = first_generation  # > 0: a standby host's ranks, replacing a lost host's
        self.recoveries: list[RecoveryRecord] = []
        self._hung: dict[int, str] = {}  # ranks this supervisor killed as hung, and why

    def run(self) -> JobReport:
        workers = {rank: self.spawn(rank, self.generation, self.control.port) for rank in self.ranks}
        self._watch(workers)
        for recovery in self.recoveries:
            recovery.rank_events = self.control.records(recovery.generation, range(self.world_size))
        self._attach_kill_times()
        return JobReport([workers[r].result for r in self.ranks], self.recoveries)

    def _watch(self, workers: dict[int, Worker]) -> None:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        beats = _Heartbeats(self.control, self.ranks, self.heartbeat_timeout_s)
        rejoins = _Rejoins(self.control, self.ranks, self.rejoin_timeout_s, first_generation=self.generation)
        kill_at, reason = None, None
        while True:
            for w in workers.values():
                w.collect()
            now = time.monotonic()
            codes = {r: w.exit_code() for r, w in workers.items()}
            for r, code in codes.items():
                if code is not None and workers[r].exited_at == float("inf"):
                    workers[r].exited_at = now
            if all(c is not None for c in codes.values()):
                break
            if kill_at is None:
                try:
                    kill_at, reason = self._decide(workers, codes, beats, rejoins, now, deadline)
                except dist.DistNetworkError as error:  # nothing can coordinate a recovery any more
                    kill_at, reason = now, self._store_lost(error)
            elif now >= kill_at:
                for w in workers.values():
                    w.kill()
            time.sleep(POLL_S)
        for w in workers.values():
            w.reap()
        _raise_on_failure(list(workers.values()), reason)

    def _decide(self, workers: dict[int, Worker], codes: dict[int, int | None], beats: "_Heartbeats",
                rejoins: "_Rejoins", now: float, deadline: float | None) -> tuple[float | None, str | None]:
        """One look at the ranks: (when to kill them all, why), or (None, None) to go on."""
        dead = [r for r, c in codes.items() if c is not None and c < 0]
        failed = [r for r, c in codes.items() if c is not None and c > 0]
        hung = {rank: f"sent no heartbeat for {self.heartbeat_timeout_s:g} s" for rank in beats.hung(codes)}
        if hung and not self._training_over(codes):  # a finished rank stops beating while it exits
            for rank, why in hung.items():
                print(f"moetion supervisor: rank {rank} {why}; killing it", flush=True)
                self._hung[rank] = why
                workers[rank].kill()
        stuck = rejoins.stuck(codes)
        for rank, generation in stuck if stuck and not self._training_over(codes) else []:
            print(f"moetion supervisor: rank {rank} has not rejoined generation {generation} "
                  f"{self.rejoin_timeout_s:g} s after its failure notice: it is probably stuck in a gloo send whose "
                  "connection closed mid-write (docs/timeouts-and-spares.md); its own wait ends at its "
                  "peer_timeout_s", flush=True)
        lost = self.hosts.lost_host() if self.hosts is not None else None
        if lost is not None:
            self.control.declare_fatal(lost)
        fatal = self.control.fatal()
        if fatal is not None:
            return now + self.grace_s, fatal
        if dead and self._training_over(codes):  # a replacement would wait for peers that are leaving
            why = (f"rank(s) {dead} {', '.join(_describe_exit(codes[r]) for r in dead)} after every rank had "
                   "finished training: nothing is left to recover with (the others are exiting)")
            self.control.declare_fatal(why)
            return now + self.grace_s, why
        if failed or (dead and not self._may_replace()):
            self.control.declare_fatal(f"rank(s) {failed or dead} failed: "
                                       + ", ".join(_describe_exit(codes[r]) for r in failed or dead))
            return now + self.grace_s, None
        if dead:
            self._replace(workers, dead)
            beats.reset(dead)
            rejoins.replaced(dead, self.generation)
        elif deadline is not None and now > deadline:
            return now, f"timed out after {self.timeout_s} s"
        return None, None

    def _store_lost(self, error: Exception) -> str:
        self.store_lost = True
        return (f"the job's control store at {self.control.host}:{self.control.port} stopped answering "
                f"({str(error).splitlines()[0]}): no failure can be recovered without it, and a restarted store "
                "would not know the job's generations, so every rank was stopped; restart the job from its "
                "persisted windows with `moetion launch --resume`")

    def _training_over(self, codes: dict[int, int | None]) -> bool:
        """Every rank finished (a clean exit, or its engine closed): no group can form again."""
        # The job's newest generation: in a multi-host job another host's supervisor may publish it.
        return any(c == 0 for c in codes.values()) or self.control.all_done(self.control.generation(), self.world_size)

    def _may_replace(self) -> bool:
        return self.recover and len(self.recoveries) < self.max_restarts

    def _replace(self, workers: dict[int, Worker], dead: list[int]) -> None:
        detected = time.time()
        time.sleep(SETTLE_S)  # ranks dying together (a host) recover in one generation
        dead = [r for r, w in workers.items() if w.exit_code() is not None and w.exit_code() < 0]
        causes = {r: _describe_exit(workers[r].exit_code()) + (f" ({self._hung.pop(r)})" if r in self._hung else "")
                  for r in dead}
        why = "; ".join(f"rank {r} {causes[r]}" for r in dead)
        self.generation = self.control.announce_generation(why, world_size=self.world_size)
        for rank in dead:
            workers[rank].reap()
            workers[rank] = self.spawn(rank, self.generation, self.control.port)
        self.recoveries.append(RecoveryRecord(self.generation, dead, causes, detected_at=detected, respawned_at=time.time(),
                                              kinds={r: workers[r].kind for r in dead}))
        print(f"moetion supervisor: rank(s) {dead} {', '.join(sorted(set(causes.values())))}; "
              f"replaced, generation {self.generation}", flush=True)

    def _attach_kill_times(self) -> None:
        """Matches fault-injection records (``MOETION_FAULT_LOG``) to the recoveries they caused."""
        if self.fault_log is None:
            return
        kills = read_fault_log(self.fault_log)
        for recovery in self.recoveries:
            times = [k.time for k in kills if k.rank in recovery.ranks and k.time <= recovery.detected_at]
            if times:
                recovery.killed_at = max(times)


class _Heartbeats:
    """Notices a rank whose heartbeat counter stopped moving while its process lives.

    A rank is watched only once it has beaten (a replacement's start-up, however slow, is not a hang).
    """

    def __init__(self, control: ControlPlane, ranks: list[int], timeout_s: float) -> None:
        self.control, self.ranks, self.timeout_s = control, ranks, timeout_s
        # Beats are (generation the process started in, count): they only ever grow, so an old
        # signed value written back by a stranger never looks like progress.
        self.baseline = dict.fromkeys(ranks, (-1, 0))  # the beat before this process of the rank started beating
        self.last = dict.fromkeys(ranks, (-1, 0))
        self.moved_at = dict.fromkeys(ranks, time.monotonic())
        self.checked_at = 0.0
        self.reset(ranks)  # a standby host's ranks: the lost host's last beats are not theirs

    def reset(self, ranks: list[int]) -> None:
        counts = self.control.heartbeats(ranks)
        for rank in ranks:
            self.baseline[rank] = self.last[rank] = max(counts[rank] or self.last[rank], self.last[rank])

    def hung(self, codes: dict[int, int | None]) -> list[int]:
        now = time.monotonic()
        if now - self.checked_at < LOOK_EVERY_S:
            return []
        self.checked_at = now
        stuck = []
        for rank, count in self.control.heartbeats(self.ranks).items():
            if count is not None and count > self.last[rank]:
                self.last[rank], self.moved_at[rank] = count, now
            elif self.last[rank] > self.baseline[rank] and codes[rank] is None and now - self.moved_at[rank] > self.timeout_s:
                stuck.append(rank)
                self.moved_at[rank] = now
        return stuck


class _Rejoins:
    """Notices a survivor that has not arrived in the job's newest generation ``timeout_s`` after
    this supervisor first saw it (its own or another host's). Replacements are not watched: a
    start-up, however slow, is not a hang."""

    def __init__(self, control: ControlPlane, ranks: list[int], timeout_s: float, *, first_generation: int) -> None:
        self.control, self.timeout_s = control, timeout_s
        self.started_in = dict.fromkeys(ranks, first_generation)  # the generation each rank's process started in
        self.generation, self.seen_at = first_generation, time.monotonic()
        self.named: set[tuple[int, int]] = set()  # (rank, generation) already reported
        self.checked_at = 0.0

    def replaced(self, ranks: list[int], generation: int) -> None:
        self.started_in.update(dict.fromkeys(ranks, generation))

    def stuck(self, codes: dict[int, int | None]) -> list[tuple[int, int]]:
        """(rank, generation) of each live survivor overdue in the newest generation; each once."""
        now = time.monotonic()
        if now - self.checked_at < LOOK_EVERY_S:
            return []
        self.checked_at = now
        newest = self.control.generation()
        if newest != self.generation:
            self.generation, self.seen_at = newest, now
        if now - self.seen_at <= self.timeout_s:
            return []
        overdue = [(rank, newest) for rank, started in self.started_in.items()
                   if started < newest and codes[rank] is None and (rank, newest) not in self.named
                   and not self.control.arrived(newest, rank)]
        self.named.update(overdue)
        return overdue


def _raise_on_failure(workers: list[Worker], reason: str | None) -> None:
    failures = sorted(
        (w for w in workers if w.exit_code() != 0),
        key=lambda w: (w.error is not None and "PeerFailure" in w.error, w.exited_at),
    )
    if not failures and reason is None:
        return
    lines = [reason] if reason else []
    if failures:
        lines.append(f"{len(failures)} of {len(workers)} ranks failed")
    for w in failures:
        lines.append(f"rank {w.rank}: {_describe_exit(w.exit_code())}")
        if w.error:
            lines.append("  " + w.error.strip().replace("\n", "\n  "))
    raise LaunchError("\n".join(lines))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
