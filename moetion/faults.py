"""Deterministic fault injection: a process SIGKILLs itself at a named phase of an iteration.

Kill specs come from the ``MOETION_KILL`` environment variable, e.g.
``stage=1,iter=5,phase=capture;stage=3,iter=9,phase=backward``, so a test or the fault harness
can aim a real SIGKILL at an exact point without touching the training code. ``memory=lost``
also wipes the stage's shared-memory windows first, as if its whole host had gone;
``signal=stop`` hangs the process (SIGSTOP) instead, which only a heartbeat can tell from slowness.

Each kill is fired once per job: a replacement passing the same point again lives. When
``MOETION_FAULT_LOG`` names a file, every kill appends a JSON line (rank, spec, wall-clock time)
there first, which the supervisor turns into the recovery timeline's first event.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from moetion import env
from moetion.errors import ConfigError

PHASES = ("forward", "backward", "step", "capture", "replication", "persistence", "replay", "paused", "handover")
# When a spec's ``iter`` matches: several phases happen only at some iterations, so a spec naming
# another iteration never fires (the harness then fails the run naming it).
PHASE_RULES = {
    "forward": "during iteration iter's forward passes",
    "backward": "during iteration iter's backward passes",
    "step": "after iteration iter's commit all-gather, before its optimizer step",
    "capture": "only if iter is the LAST iteration of a snapshot window (when the window is published)",
    "replication": "only if iter is the last iteration of a window, while that window is sent to the peer "
                   "(needs replication and a peer)",
    "persistence": "only if iter is the last iteration of a persisted window (needs a persist dir; "
                   "every persist_every-th window)",
    "replay": "only while a replacement replays iteration iter (so only after an earlier kill of a neighbour)",
    "paused": "only while a survivor is paused in iteration iter for another rank's recovery (so only with "
              "another kill in iteration iter)",
    "handover": "only while a survivor, paused in iteration iter, sends upstream logs to a replacement: after "
                "their size, before their bytes (so only with a kill of a neighbour in iteration iter)",
}
_log = logging.getLogger(__name__)
_memory: list[Path] = []  # this process's shared-memory directories, wiped by memory=lost


@dataclass(frozen=True)
class KillSpec:
    stage: int
    iteration: int
    phase: str
    replica: int = 0
    memory_lost: bool = False
    hang: bool = False  # SIGSTOP instead of SIGKILL: only the supervisor's heartbeat notices

    @classmethod
    def parse(cls, text: str) -> "KillSpec":
        fields = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep:
                raise ConfigError(f"kill spec {text!r}: expected key=value pairs, got {part!r}")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"stage", "iter", "phase", "replica", "memory", "signal"}
        if unknown or not {"stage", "iter", "phase"} <= set(fields):
            raise ConfigError(
                f"kill spec {text!r}: needs stage=, iter=, phase= (optionally replica=, memory=lost, signal=stop)")
        if fields.get("signal", "kill") not in ("kill", "stop"):
            raise ConfigError(f"kill spec {text!r}: signal must be 'kill' or 'stop'")
        if fields["phase"] not in PHASES:
            raise ConfigError(f"kill spec {text!r}: phase must be one of {PHASES}")
        if fields.get("memory", "kept") not in ("kept", "lost"):
            raise ConfigError(f"kill spec {text!r}: memory must be 'kept' or 'lost'")
        try:
            return cls(int(fields["stage"]), int(fields["iter"]), fields["phase"], int(fields.get("replica", 0)),
                       fields.get("memory") == "lost", fields.get("signal") == "stop")
        except ValueError:
            raise ConfigError(f"kill spec {text!r}: stage, iter and replica must be integers") from None

    def check_against(self, *, stages: int | None, replicas: int | None, iterations: int | None) -> None:
        """Raises ConfigError if this spec cannot match the job (``None``: that bound is unknown)."""
        for name, value, bound, what in (("stage", self.stage, stages, "stages"),
                                         ("replica", self.replica, replicas, "data-parallel replicas"),
                                         ("iter", self.iteration, iterations, "iterations")):
            if value < 0 or (bound is not None and value >= bound):
                limit = f"0..{bound - 1}" if bound is not None else ">= 0"
                raise ConfigError(
                    f"kill spec {self.to_text()!r}: {name}={value} is outside this job's {what} ({limit})")

    def to_text(self) -> str:
        text = f"stage={self.stage},iter={self.iteration},phase={self.phase},replica={self.replica}"
        return text + (",memory=lost" if self.memory_lost else "") + (",signal=stop" if self.hang else "")


@lru_cache(maxsize=1)
def _specs(raw: str) -> tuple[KillSpec, ...]:
    return tuple(KillSpec.parse(part) for part in raw.split(";") if part.strip())


def faults_armed() -> bool:
    """Whether any kill is armed in this process; callers skip their fault points when not."""
    return bool(env.armed_kills())


def register_memory(directory: Path) -> None:
    """Names a shared-memory directory of this process, for kill specs with ``memory=lost``."""
    _memory.append(directory)


def fault_point(phase: str, *, stage: int, replica: int, iteration: int) -> None:
    """SIGKILLs this process if a kill spec names this (stage, replica, iteration, phase)."""
    raw = env.armed_kills()
    if not raw:
        return
    for spec in _specs(raw):
        if (spec.stage, spec.replica, spec.iteration, spec.phase) == (stage, replica, iteration, phase):
            if _fired_before(spec):
                continue
            _record(spec)
            if spec.memory_lost:
                for directory in _memory:
                    shutil.rmtree(directory, ignore_errors=True)
            os.kill(os.getpid(), signal.SIGSTOP if spec.hang else signal.SIGKILL)


def _record(spec: KillSpec) -> None:
    path = env.fault_log()
    if path:
        rank = env.rank_or_none()
        line = json.dumps({"rank": -1 if rank is None else rank, "spec": spec.to_text(), "time": time.time()})
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(path, flags, 0o600), "a") as log:  # 0600, never through a planted link
            log.write(line + "\n")


def _fired_before(spec: KillSpec) -> bool:
    """A replacement re-runs the iteration its predecessor died in: a spec that killed the
    predecessor must not kill it again (the launcher always gives a job with kills a fault log)."""
    path = env.fault_log()
    if not path:
        return False
    return any(record.spec == spec.to_text() for record in read_fault_log(Path(path)))


@dataclass(frozen=True)
class FaultRecord:
    """One line of the fault log: a kill that fired."""

    rank: int
    spec: str
    time: float


def read_fault_log(path: Path) -> list[FaultRecord]:
    """The kills recorded in ``path`` (none if it does not exist).

    A line that is not a well-formed record is skipped, with a warning: a SIGKILL may tear the
    last line, and the file may have been written by something else; neither may crash the reader.
    """
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        record = _parse_record(line)
        if record is None and line.strip():
            _log.warning("fault log %s line %d is not a kill record; ignored: %.80r", path, number, line)
        elif record is not None:
            records.append(record)
    return records


def _parse_record(line: bytes) -> FaultRecord | None:
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    rank, spec, when = raw.get("rank"), raw.get("spec"), raw.get("time")
    if type(rank) is not int or not isinstance(spec, str) or type(when) not in (int, float):
        return None
    return FaultRecord(rank, spec, float(when))
