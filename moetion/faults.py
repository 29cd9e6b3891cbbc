"""Deterministic fault injection: a process SIGKILLs itself at a named phase of an iteration.

Kill specs come from the ``MOETION_KILL`` environment variable, e.g.
``stage=1,iter=5,phase=capture;stage=3,iter=9,phase=backward``, so a test or the fault harness
can aim a real SIGKILL at an exact point without touching the training code.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from functools import lru_cache

from moetion.errors import ConfigError

ENV = "MOETION_KILL"
PHASES = ("forward", "backward", "step", "capture", "replication", "persistence")


@dataclass(frozen=True)
class KillSpec:
    stage: int
    iteration: int
    phase: str
    replica: int = 0

    @classmethod
    def parse(cls, text: str) -> "KillSpec":
        fields = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep:
                raise ConfigError(f"kill spec {text!r}: expected key=value pairs, got {part!r}")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"stage", "iter", "phase", "replica"}
        if unknown or not {"stage", "iter", "phase"} <= set(fields):
            raise ConfigError(f"kill spec {text!r}: needs stage=, iter=, phase= (and optionally replica=)")
        if fields["phase"] not in PHASES:
            raise ConfigError(f"kill spec {text!r}: phase must be one of {PHASES}")
        return cls(int(fields["stage"]), int(fields["iter"]), fields["phase"], int(fields.get("replica", 0)))

    def to_text(self) -> str:
        return f"stage={self.stage},iter={self.iteration},phase={self.phase},replica={self.replica}"


@lru_cache(maxsize=1)
def _specs(raw: str) -> tuple[KillSpec, ...]:
    return tuple(KillSpec.parse(part) for part in raw.split(";") if part.strip())


def fault_point(phase: str, *, stage: int, replica: int, iteration: int) -> None:
    """SIGKILLs this process if a kill spec names this (stage, replica, iteration, phase)."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    for spec in _specs(raw):
        if (spec.stage, spec.replica, spec.iteration, spec.phase) == (stage, replica, iteration, phase):
            os.kill(os.getpid(), signal.SIGKILL)
