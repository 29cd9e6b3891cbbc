"""The text summary of a run's metrics: iterations, failures, time lost, overhead.

Pure arithmetic over the records of :mod:`moetion.metrics`, one definition per figure (the plots and
``moetion report`` use these, never a second computation).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from moetion.metrics import IterationRecord, Record, RecoveryRecord

MiB = 2**20


@dataclass(frozen=True)
class Failure:
    """One recovery (a generation), from every rank's record of it."""

    generation: int
    replaced_ranks: list[int]
    sources: dict[int, str]
    abandoned_iteration: int | None  # the iteration in flight when it struck (None: after the last)
    resume: int
    lost_s: float  # first detection to the last rank resumed, plus the in-flight work discarded


@dataclass(frozen=True)
class RunSummary:
    ranks: int
    iterations: int  # distinct committed iterations
    final_loss: float
    median_iteration_ms: float
    capture_share: float  # of all ranks' iteration time, the training thread inside the checkpointer
    logging_share: float  # ... inside the upstream log
    metrics_share: float  # ... writing metrics
    peak_log_host_bytes: int  # the largest any one rank held
    peak_window_host_bytes: int
    failures: list[Failure]

    @property
    def lost_s(self) -> float:
        return sum(f.lost_s for f in self.failures)

    def lines(self) -> list[str]:
        out = [
            f"{self.iterations} iterations on {self.ranks} rank(s); final loss {self.final_loss:.4f}; "
            f"median iteration {self.median_iteration_ms:.1f} ms",
            f"training-thread overhead: capture {self.capture_share:.2%}, logging {self.logging_share:.2%}, "
            f"metrics {self.metrics_share:.2%} of iteration time",
            f"host memory, largest rank: logs {self.peak_log_host_bytes / MiB:.1f} MiB, "
            f"windows {self.peak_window_host_bytes / MiB:.1f} MiB",
            f"{len(self.failures)} failure(s), {self.lost_s:.2f} s lost",
        ]
        for f in self.failures:
            where = f"iteration {f.abandoned_iteration}" if f.abandoned_iteration is not None else "after the last iteration"
            sources = ", ".join(f"rank {r} from {s}" for r, s in sorted(f.sources.items()))
            out.append(f"  generation {f.generation}: at {where}, resumed at {f.resume} ({sources}); {f.lost_s:.2f} s lost")
        return out


def iterations_of(runs: dict[int, list[Record]]) -> list[IterationRecord]:
    return [r for records in runs.values() for r in records if isinstance(r, IterationRecord)]


def recoveries_of(runs: dict[int, list[Record]]) -> dict[int, list[RecoveryRecord]]:
    """Each generation's recovery records, one per rank."""
    by_generation: dict[int, list[RecoveryRecord]] = {}
    for records in runs.values():
        for r in records:
            if isinstance(r, RecoveryRecord):
                by_generation.setdefault(r.generation, []).append(r)
    return dict(sorted(by_generation.items()))


def summarize(runs: dict[int, list[Record]]) -> RunSummary:
    iterations = iterations_of(runs)
    if not iterations:
        return RunSummary(len(runs), 0, float("nan"), float("nan"), 0.0, 0.0, 0.0, 0, 0,
                          [_failure(g, rs) for g, rs in recoveries_of(runs).items()])
    total_ms = sum(r.iteration_ms for r in iterations) or 1.0
    last = max(iterations, key=lambda r: r.iteration)
    return RunSummary(
        ranks=len(runs),
        iterations=len({r.iteration for r in iterations}),
        final_loss=last.loss,
        median_iteration_ms=statistics.median(r.iteration_ms for r in iterations),
        capture_share=sum(r.capture_ms for r in iterations) / total_ms,
        logging_share=sum(r.logging_ms for r in iterations) / total_ms,
        metrics_share=sum(r.metrics_ms for r in iterations) / total_ms,
        peak_log_host_bytes=max(r.log_host_bytes for r in iterations),
        peak_window_host_bytes=max(r.window_host_bytes for r in iterations),
        failures=[_failure(g, rs) for g, rs in recoveries_of(runs).items()],
    )


def _failure(generation: int, records: list[RecoveryRecord]) -> Failure:
    survivors = [r for r in records if r.role == "survivor"]
    replacements = [r for r in records if r.role == "replacement"]
    begun = min((r.detected_at for r in survivors if r.detected_at is not None),
                default=min(r.joined_at for r in records))
    discarded = max((r.inflight_s or 0.0 for r in survivors), default=0.0)
    abandoned = [r.iteration for r in survivors if r.inflight_s]  # a rank lost after the last: none in flight
    return Failure(
        generation=generation,
        replaced_ranks=sorted(r.rank for r in replacements),
        sources={r.rank: r.source for r in replacements if r.source is not None},
        abandoned_iteration=max(abandoned) if abandoned else None,
        resume=max(r.resume for r in records),
        lost_s=max(r.resumed_at for r in records) - begun + discarded,
    )
