"""The window scheduler: how many iterations W a sparse-checkpoint window spans, and which
operators take their full snapshot at which iteration of it (the paper's Algorithm 1).

Pure functions of byte counts and popularity, so the runtime and ``moetion plan`` share them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from moetion.errors import ConfigError
from moetion.operators import Operator


@dataclass(frozen=True)
class SlotPlan:
    """Operators (by name) in snapshot order, split into W contiguous slots."""

    slots: tuple[tuple[str, ...], ...]

    @property
    def window(self) -> int:
        return len(self.slots)


def split_into_slots(order: Sequence[str], window: int) -> SlotPlan:
    """Contiguous slots whose sizes differ by at most one (the larger ones first).

    A stage with fewer operators than the job-wide window leaves its last slots empty.
    """
    if window < 1:
        raise ConfigError(f"window must be >= 1, got {window}")
    base, extra = divmod(len(order), window)
    slots, start = [], 0
    for i in range(window):
        size = base + (1 if i < extra else 0)
        slots.append(tuple(order[start : start + size]))
        start += size
    return SlotPlan(tuple(slots))


def slot_cost(plan: SlotPlan, i: int, *, full: Mapping[str, int], compute: Mapping[str, int]) -> int:
    """Bytes copied after step t0+i: slot i's full snapshots plus later slots' compute snapshots."""
    later = sum(compute[op] for slot in plan.slots[i + 1 :] for op in slot)
    return sum(full[op] for op in plan.slots[i]) + later


@dataclass(frozen=True)
class BackgroundWork:
    """What one background thread did with snapshot bytes so far: its CPU-seconds and the bytes it
    handled; ``share``: the fraction of captured bytes that reach it (persisting every k-th window: 1/k)."""

    cpu_seconds: float
    nbytes: int
    share: float = 1.0


def cpu_seconds_per_captured_byte(work: Sequence[BackgroundWork], *, first_guess: float) -> float:
    """Background CPU-seconds that one captured byte costs, over every thread that handles it.

    Each thread's cost is normalized by the bytes *it* handled, so a tier that lags a window behind
    the capture (replication, persistence) is not under-counted. A thread that has handled nothing
    yet counts as the first measured one (each touches every byte about once, like the capture),
    or as ``first_guess`` before anything was measured.
    """
    measured = [w.cpu_seconds / w.nbytes for w in work if w.nbytes > 0]
    stand_in = measured[0] if measured else first_guess
    return sum(w.share * (w.cpu_seconds / w.nbytes if w.nbytes > 0 else stand_in) for w in work)


def capture_budget_bytes(*, fraction: float, seconds_per_iteration: float, seconds_per_byte: float) -> float:
    """Algorithm 1's per-iteration byte budget: ``fraction`` of an iteration's cost, spent at
    ``seconds_per_byte``. With CUDA both are wall-clock (the copy runs behind compute); on CPU both
    are CPU-seconds (training thread's, and every background thread's per captured byte)."""
    return fraction * seconds_per_iteration / seconds_per_byte


def find_window_size(
    order: Sequence[str], *, full: Mapping[str, int], compute: Mapping[str, int], budget_bytes: float
) -> int:
    """The smallest W whose most expensive slot fits the per-iteration budget (Algorithm 1).

    Raises ConfigError when even one operator per slot does not fit.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"the snapshot budget must be > 0 bytes per iteration, got {budget_bytes}")
    for window in range(1, max(1, len(order)) + 1):
        plan = split_into_slots(order, window)
        if max(slot_cost(plan, i, full=full, compute=compute) for i in range(window)) <= budget_bytes:
            return window
    worst = max(slot_cost(split_into_slots(order, len(order)), i, full=full, compute=compute) for i in range(len(order)))
    raise ConfigError(
        f"no window fits a budget of {budget_bytes / 2**20:.2f} MiB per iteration: even one operator per "
        f"slot needs {worst / 2**20:.2f} MiB; raise snapshot bandwidth or iteration time, or pin `window`"
    )


def snapshot_order(operators: Sequence[Operator], popularity: Mapping[str, float]) -> list[str]:
    """Experts by ascending popularity (ties by name), then routers and dense operators last."""
    experts = sorted((op for op in operators if op.kind == "expert"), key=lambda op: (popularity.get(op.name, 0.0), op.name))
    others = [op for op in operators if op.kind != "expert"]
    return [op.name for op in experts] + [op.name for op in others]


def popularity_drifted(
    before: Mapping[str, float], after: Mapping[str, float], *, change: float = 0.10, fraction: float = 0.25
) -> bool:
    """True when more than ``change`` relative change hit at least ``fraction`` of the experts."""
    if not before:
        return bool(after)
    moved = sum(
        1 for name in after
        if abs(after[name] - before.get(name, 0.0)) > change * max(before.get(name, 0.0), 1e-12)
    )
    return moved >= math.ceil(fraction * len(after))
