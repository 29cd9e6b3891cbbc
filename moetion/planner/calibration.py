"""Measured fixed costs that replace the planner's assumed ones (``moetion plan --calibrate FILE``).

``experiments/bench_recovery.py`` writes the file from real recoveries: the fixed part of a
localized recovery (detection, respawn, rejoin, window load), the replay rate relative to a
training iteration, the wall time of a global restart, and (optionally, from bench_overhead) the
share of an iteration the training thread is blocked by snapshots. Each given field replaces the
preset's assumption; a field left out keeps it. The file is small JSON, read with a size bound.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from moetion.errors import ConfigError
from moetion.planner.cost import ApproachCost, HardwareSpec

FORMAT = "moetion-calibration/1"
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Measured costs; None: not measured, keep the preset's figure."""

    fixed_recovery_s: float | None = None  # kill -> replacement ready to replay (localized recovery)
    restart_s: float | None = None  # kill -> every rank reloaded (global restart)
    replay_speedup: float | None = None  # replayed stage-iterations per training iteration time
    overhead_fraction: float | None = None  # snapshot blocking / iteration time at W auto
    measured_on: str = ""

    def describe(self) -> str:
        given = [f"{f.name}={getattr(self, f.name):.4g}" for f in fields(self)
                 if f.name != "measured_on" and getattr(self, f.name) is not None]
        return f"calibrated ({', '.join(given) or 'nothing'}) from measurements on {self.measured_on or 'an unnamed machine'}"


def load_calibration(path: str | Path) -> Calibration:
    """Reads and validates a calibration file written by bench_recovery.py."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: calibration file is {size} bytes, expected at most {MAX_FILE_BYTES}")
        raw = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read calibration file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not JSON ({error}); expected the calibration.json bench_recovery.py writes") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{path}: format {found!r}, expected {FORMAT!r} (run experiments/bench_recovery.py)")
    fixed = _sum_present(raw, ("detect_s", "respawn_s", "rejoin_s", "script_s", "load_s", "logs_s"))
    speedup = None
    if raw.get("replay_iterations_per_s") is not None and raw.get("iteration_s") is not None:
        speedup = _number(raw, "replay_iterations_per_s") * _number(raw, "iteration_s")
    return Calibration(fixed_recovery_s=fixed, restart_s=_optional(raw, "restart_s"), replay_speedup=speedup,
                       overhead_fraction=_optional(raw, "overhead_fraction"), measured_on=str(raw.get("measured_on", "")))


def calibrate_hardware(hardware: HardwareSpec, calibration: Calibration) -> HardwareSpec:
    """The hardware with measured respawn (localized) and restart (global) times."""
    changes = {}
    if calibration.fixed_recovery_s is not None:
        changes["respawn_s"] = calibration.fixed_recovery_s
    if calibration.restart_s is not None:
        changes["restart_s"] = calibration.restart_s
    return replace(hardware, **changes)


def calibrate_costs(costs: dict[str, ApproachCost], calibration: Calibration) -> dict[str, ApproachCost]:
    """moetion's (the sparse approach's) replay speed-up and snapshot stall set to the measured ones."""
    sparse = costs["moevement"]
    changes = {}
    if calibration.replay_speedup is not None:
        changes["replay_speedup"] = calibration.replay_speedup
    if calibration.overhead_fraction is not None:
        changes["checkpoint_stall_s"] = calibration.overhead_fraction * sparse.iteration_s * sparse.interval
    return {**costs, "moevement": replace(sparse, **changes)}


def _number(raw: dict, key: str) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"calibration field {key!r} must be a finite number >= 0, got {value!r}")
    return float(value)


def _optional(raw: dict, key: str) -> float | None:
    return _number(raw, key) if raw.get(key) is not None else None


def _sum_present(raw: dict, keys: tuple[str, ...]) -> float | None:
    present = [_number(raw, key) for key in keys if raw.get(key) is not None]
    return sum(present) if present else None
