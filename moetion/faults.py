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
import os
import shutil
import signal
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from moetion.errors import ConfigError

ENV = "MOETION_KILL"
FAULT_LOG_ENV = "MOETION_FAULT_LOG"
PHASES = ("forward", "backward", "step", "capture", "replication", "persistence", "replay")
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

    def to_text(self) -> str:
        text = f"stage={self.stage},iter={self.iteration},phase={self.phase},replica={self.replica}"
        return text + (",memory=lost" if self.memory_lost else "") + (",signal=stop" if self.hang else "")


@lru_cache(maxsize=1)
def _specs(raw: str) -> tuple[KillSpec, ...]:
    return tuple(KillSpec.parse(part) for part in raw.split(";") if part.strip())


def faults_armed() -> bool:
    """Whether any kill is armed in this process; callers skip their fault points when not."""
    return bool(os.environ.get(ENV))


def register_memory(directory: Path) -> None:
    """Names a shared-memory directory of this process, for kill specs with ``memory=lost``."""
    _memory.append(directory)


def fault_point(phase: str, *, stage: int, replica: int, iteration: int) -> None:
    """SIGKILLs this process if a kill spec names this (stage, replica, iteration, phase)."""
    raw = os.environ.get(ENV)
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
    path = os.environ.get(FAULT_LOG_ENV)
    if path:
        line = json.dumps({"rank": int(os.environ.get("RANK", -1)), "spec": spec.to_text(), "time": time.time()})
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(path, flags, 0o600), "a") as log:  # 0600, never through a planted link
            log.write(line + "\n")


def _fired_before(spec: KillSpec) -> bool:
    """A replacement re-runs the iteration its predecessor died in: a spec that killed the
    predecessor must not kill it again (the launcher always gives a job with kills a fault log)."""
    path = os.environ.get(FAULT_LOG_ENV)
    if not path or not os.path.exists(path):
        return False
    return any(json.loads(line)["spec"] == spec.to_text() for line in open(path) if line.strip())
