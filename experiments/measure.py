"""Measures that survive a noisy machine, shared by every benchmark.

On a shared, saturated CPU, wall-clock ratios of a few percent between runs are noise. So each
benchmark reports, per row:

  (a) blocked ms/iter  the training thread's time inside moetion's blocking points (or inside a
                       peer's save call), from per-thread timestamps (moetion.profiling); beside it
                       the training thread's CPU time there (wall minus preemption, waits excluded);
  (b) bg CPU share     CPU-seconds of moetion's background threads per iteration, as a share of the
                       training thread's CPU-seconds; ``extra CPU`` is the CPU of every thread but
                       the training one, minus the baseline row's (the only fair figure for peers,
                       whose threads moetion cannot name);
  (c) bytes            copied, stored and sent per iteration;
  (d) wall ratio       per round against the baseline row of the same round (rows run interleaved
                       so noise hits them alike), with an **A/A row**: the baseline run twice per
                       round. The A/A ratio's largest distance from 1 over the rounds is the noise
                       band; a row whose ratio is inside it is printed as "within noise".

Stage processes call :class:`StageProbe` around their timed loop; the parent gathers the rounds
with :func:`interleave` and turns them into rows with :func:`summarize`.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from moetion.profiling import LEDGER

RESULTS = Path(__file__).parent / "results"
AA_SUFFIX = " (A/A)"


class StageProbe:
    """Per-stage figures over a timed span; create and call on the training thread."""

    def __init__(self) -> None:
        self._extra_blocked = self._extra_blocked_cpu = 0.0
        self._start()

    def _start(self) -> None:
        self._wall = time.perf_counter()
        self._train_cpu = time.thread_time()
        self._process_cpu = time.process_time()
        self._cost = LEDGER.snapshot()

    def restart(self) -> None:
        """Call right before the timed iterations (after warm-up)."""
        self._extra_blocked = self._extra_blocked_cpu = 0.0
        self._start()

    def add_blocked(self, seconds: float, cpu_seconds: float = 0.0) -> None:
        """Blocking outside moetion (a peer's save call), timed by the caller."""
        self._extra_blocked += seconds
        self._extra_blocked_cpu += cpu_seconds

    def stop(self, seconds: list[float]) -> dict:
        """The span's figures per iteration; ``seconds``: each timed iteration's wall time.
        Call before the engine closes (background threads' clocks end with them)."""
        n = max(1, len(seconds))
        train_cpu = time.thread_time() - self._train_cpu
        other_cpu = time.process_time() - self._process_cpu - train_cpu
        cost = LEDGER.snapshot() - self._cost
        blocked = {k: v / n for k, v in cost.blocked_s.items() if v}
        blocked_cpu = {k: v / n for k, v in cost.blocked_cpu_s.items() if v}
        if self._extra_blocked:
            blocked["peer_save"] = self._extra_blocked / n
            blocked_cpu["peer_save"] = self._extra_blocked_cpu / n
        return {"seconds": seconds, "iterations": len(seconds), "train_cpu_s": train_cpu / n,
                "other_cpu_s": other_cpu / n, "background_cpu_s": cost.background_cpu_s / n,
                "blocked_s": blocked, "blocked_cpu_s": blocked_cpu,
                "bytes": {k: v / n for k, v in cost.bytes.items() if v}}


def with_aa(rows: dict[str, tuple], baseline: str) -> dict[str, tuple]:
    """``rows`` with the baseline run a second time per round, right after it, as the A/A row."""
    out = {}
    for label, row in rows.items():
        out[label] = row
        if label == baseline:
            out[label + AA_SUFFIX] = row
    return out


def interleave(rows: dict[str, tuple], run: Callable[..., list[dict]], *, rounds: int) -> dict[str, list[list[dict]]]:
    """Runs every row (``run(*row)`` -> per-stage results) once per round, rows in turn."""
    per_row: dict[str, list[list[dict]]] = {label: [] for label in rows}
    for round_index in range(rounds):
        for label, row in rows.items():
            stages = run(*row)
            per_row[label].append(stages)
            print(f"round {round_index + 1}/{rounds}: {label:18s} median "
                  f"{statistics.median(stages[0]['seconds']) * 1000:.1f} ms", flush=True)
    return per_row


@dataclass(frozen=True)
class Row:
    label: str
    median_ms: float  # stage 0's median iteration time over all rounds (the pipeline's time)
    ratio: float  # median over rounds of (row / baseline of the same round)
    ratio_low: float
    ratio_high: float
    band: float  # the run's A/A noise band: |A/A ratio - 1| at most this
    verdict: str
    blocked_ms: float  # worst stage's training-thread time blocked per iteration
    blocked_share: float  # of that stage's own median iteration time
    blocked_by: dict[str, float]  # worst stage's ms per category
    blocked_cpu_ms: float  # that stage's training-thread CPU time inside the blocking points
    background_cpu_share: float  # moetion's background threads / training threads, summed over stages
    extra_cpu_share: float  # every non-training thread, minus the baseline's, / training threads
    bytes_per_iteration: dict[str, float]  # summed over stages

    def to_dict(self) -> dict:
        return asdict(self)


def noise_band(per_row: dict[str, list[list[dict]]], baseline: str) -> float:
    """Largest distance from 1 of the A/A row's per-round ratio (0.0 without an A/A row)."""
    aa = per_row.get(baseline + AA_SUFFIX)
    if not aa:
        return 0.0
    return max(abs(r - 1) for r in round_ratios(aa, per_row[baseline]))


def round_ratios(rounds: list[list[dict]], base: list[list[dict]]) -> list[float]:
    return [_median_s(a) / _median_s(b) for a, b in zip(rounds, base)]


def verdict(ratio: float, band: float) -> str:
    """'within noise' when ``ratio`` is inside 1 +- band, else the excess beyond the band."""
    if abs(ratio - 1) <= band:
        return "within noise"
    return f"{(ratio - 1) * 100:+.1f}% (band +-{band * 100:.1f}%)"


def summarize(per_row: dict[str, list[list[dict]]], *, baseline: str) -> list[Row]:
    """One row per label; ratios per round against ``baseline`` of the same round."""
    band = noise_band(per_row, baseline)
    base_other = _cpu_per_iteration(per_row[baseline], "other_cpu_s")
    rows = []
    for label, rounds in per_row.items():
        ratios = round_ratios(rounds, per_row[baseline])
        ratio = statistics.median(ratios)
        worst = max(range(len(rounds[0])), key=lambda s: _blocked_s(rounds, s))
        stage_median = statistics.median(x for r in rounds for x in r[worst]["seconds"])
        blocked = _blocked_s(rounds, worst)
        by = {k: statistics.mean(r[worst]["blocked_s"].get(k, 0.0) for r in rounds) * 1000
              for k in sorted({k for r in rounds for k in r[worst]["blocked_s"]})}
        train = _cpu_per_iteration(rounds, "train_cpu_s")
        nbytes = {k: statistics.mean(sum(s["bytes"].get(k, 0.0) for s in r) for r in rounds)
                  for k in sorted({k for r in rounds for s in r for k in s["bytes"]})}
        rows.append(Row(label=label, median_ms=statistics.median(x for r in rounds for x in r[0]["seconds"]) * 1000,
                        ratio=ratio, ratio_low=min(ratios), ratio_high=max(ratios), band=band,
                        verdict="(baseline)" if label == baseline else verdict(ratio, band),
                        blocked_ms=blocked * 1000, blocked_share=blocked / stage_median, blocked_by=by,
                        blocked_cpu_ms=statistics.mean(sum(r[worst]["blocked_cpu_s"].values()) for r in rounds) * 1000,
                        background_cpu_share=_cpu_per_iteration(rounds, "background_cpu_s") / train,
                        extra_cpu_share=(_cpu_per_iteration(rounds, "other_cpu_s") - base_other) / train,
                        bytes_per_iteration=nbytes))
    return rows


def compare(a: Row, b: Row) -> str:
    """Whether row ``a``'s ratio is within the noise band of row ``b``'s."""
    diff = a.ratio - b.ratio
    if abs(diff) <= a.band:
        return f"{a.label} vs {b.label}: {diff * 100:+.1f} points, within noise (band +-{a.band * 100:.1f}%)"
    return f"{a.label} vs {b.label}: {diff * 100:+.1f} points, outside the noise band (+-{a.band * 100:.1f}%)"


def print_rows(rows: list[Row], *, title: str, byte_keys: tuple[str, ...] = ("copied", "stored", "replicated")) -> None:
    print(f"\n{title}")
    heads = " ".join(f"{k[:9] + ' KiB':>13s}" for k in byte_keys)
    print(f"{'row':20s} {'ms/iter':>8s} {'x base':>7s} {'rounds':>13s} {'verdict':>30s} {'blocked ms':>10s} "
          f"{'% iter':>7s} {'CPU ms':>8s} {'bg CPU':>7s} {'extra CPU':>9s} {heads}")
    for r in rows:
        sizes = " ".join(f"{r.bytes_per_iteration.get(k, 0.0) / 1024:13.1f}" for k in byte_keys)
        print(f"{r.label:20s} {r.median_ms:8.1f} {r.ratio:7.3f} {f'{r.ratio_low:.2f}..{r.ratio_high:.2f}':>13s} "
              f"{r.verdict:>30s} {r.blocked_ms:10.3f} {r.blocked_share * 100:6.3f}% {r.blocked_cpu_ms:8.3f} {r.background_cpu_share * 100:6.2f}% "
              f"{r.extra_cpu_share * 100:8.2f}% {sizes}")
    band = rows[0].band if rows else 0.0
    print(f"noise band (A/A): +-{band * 100:.1f}%. blocked: worst stage, ms per iteration and % of its iteration "
          "(CPU ms: its CPU time there, preemption excluded); "
          "bg CPU: moetion's threads / training threads; extra CPU: all non-training threads minus the baseline's, "
          "/ training threads; bytes per iteration summed over stages.")


def write_results(name: str, report: dict) -> Path:
    """``results/<name>.json``; returns its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=_jsonable))
    print(f"wrote {path}")
    return path


def plot_rows(rows: list[Row], *, name: str, title: str) -> Path | None:
    """A PNG of each row's wall ratio with the A/A band and its blocked share, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r.label for r in rows]
    left.bar(labels, [r.ratio for r in rows], yerr=[[r.ratio - r.ratio_low for r in rows],
                                                    [r.ratio_high - r.ratio for r in rows]], capsize=3)
    band = rows[0].band if rows else 0.0
    left.axhspan(1 - band, 1 + band, color="grey", alpha=0.3, label=f"A/A noise band +-{band * 100:.1f}%")
    left.set_ylabel("wall time / baseline (per round)")
    left.legend()
    right.bar(labels, [r.blocked_share * 100 for r in rows], label="blocked % of iteration")
    right.bar(labels, [r.background_cpu_share * 100 for r in rows], alpha=0.5, label="background CPU % of training")
    right.set_ylabel("%")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    return save_figure(fig, name)


def save_figure(fig, name: str) -> Path:
    """Writes ``fig`` to experiments/results/<name>.png, closes it and says where."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _median_s(stages: list[dict]) -> float:
    """Stage 0's median iteration time (the pipeline's)."""
    return statistics.median(stages[0]["seconds"])


def _blocked_s(rounds: list[list[dict]], stage: int) -> float:
    return statistics.mean(sum(r[stage]["blocked_s"].values()) for r in rounds)


def _cpu_per_iteration(rounds: list[list[dict]], key: str) -> float:
    """Summed over stages, averaged over rounds."""
    return statistics.mean(sum(s[key] for s in r) for r in rounds)


def _jsonable(value: object) -> object:
    if isinstance(value, Row):
        return value.to_dict()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
