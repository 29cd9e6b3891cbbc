"""Effective training time ratio (ETTR): the analytic estimate and a Monte-Carlo check of it.

The analytic form (the paper's) treats overhead and recovery as independent first-order costs:

    ETTR ~= 1 / (1 + T_ckpt / (T_iter * I)) * 1 / (1 + E[R] / MTBF)

It ignores failures that strike during a recovery. The simulator does not: each failure during a
recovery restarts that recovery from the beginning, which makes ETTR fall faster than the
formula once E[R] is a sizeable fraction of the MTBF — the gap between the two columns of the
report is that second-order effect, not noise.
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from moetion.errors import ConfigError
from moetion.planner.cost import ApproachCost


def analytic_ettr(cost: ApproachCost, *, mtbf_s: float) -> float:
    """The paper's first-order ETTR for one approach."""
    if mtbf_s <= 0:
        raise ConfigError(f"mtbf_s must be > 0, got {mtbf_s}")
    return 1.0 / (1.0 + cost.overhead_fraction) / (1.0 + cost.expected_recovery_s / mtbf_s)


@dataclass(frozen=True)
class SimulationResult:
    """Mean ETTR over independent runs and its 95% confidence interval (normal approximation)."""

    mean: float
    ci_low: float
    ci_high: float
    runs: int
    failures: int

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def _one_run(cost: ApproachCost, mtbf_s: float, horizon_s: float, rng: random.Random) -> tuple[float, int]:
    """Useful seconds / horizon for one run.

    State: wall time, and progress (seconds of normal running) which fixes the position inside
    the current checkpoint interval or window. A failure in normal running costs the approach's
    fixed recovery plus replay of ``replay_base_iterations`` and of the position in the interval;
    a failure during that recovery restarts it (same position: nothing newer was saved).
    """
    cycle_s = cost.interval * cost.wall_iteration_s
    base_s = cost.replay_base_iterations * cost.wall_iteration_s
    useful_share = 1.0 / (1.0 + cost.overhead_fraction)
    now = progress = 0.0
    failures = 0
    next_failure = rng.expovariate(1.0 / mtbf_s)
    while now < horizon_s:
        if next_failure >= horizon_s:
            progress += horizon_s - now
            break
        progress += next_failure - now
        now = next_failure
        failures += 1
        # progress that was lost is counted useful once (when first done), its redo as recovery
        recovery = cost.fixed_recovery_s + (base_s + math.fmod(progress, cycle_s)) / cost.replay_speedup
        while True:
            next_failure = now + rng.expovariate(1.0 / mtbf_s)
            if next_failure >= now + recovery:
                now += recovery
                break
            now = next_failure
            failures += 1
            if now >= horizon_s:
                break
    return min(progress, horizon_s) * useful_share / horizon_s, failures


def simulate_ettr(cost: ApproachCost, *, mtbf_s: float, runs: int = 30, horizon_failures: float = 500.0,
                  seed: int = 0) -> SimulationResult:
    """Discrete-event simulation with exponential failures; ``horizon_failures`` MTBFs per run."""
    if runs < 2:
        raise ConfigError(f"runs must be >= 2 for a confidence interval, got {runs}")
    if mtbf_s <= 0 or horizon_failures <= 0:
        raise ConfigError("mtbf_s and horizon_failures must be > 0")
    rng = random.Random(seed)
    horizon = horizon_failures * mtbf_s
    values, failures = [], 0
    for _ in range(runs):
        value, count = _one_run(cost, mtbf_s, horizon, rng)
        values.append(value)
        failures += count
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(runs)
    return SimulationResult(mean, mean - half, mean + half, runs, failures)
