"""The PNGs of ``moetion report`` (matplotlib is the optional extra ``moetion[plots]``).

Each function draws one figure from the metrics records and returns the file it wrote.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from moetion.metrics import IterationRecord, RecoveryRecord
from moetion.report.summary import MiB, RunSummary

# A replacement's phases and a survivor's, in order: (label, from field, to field).
REPLACEMENT_PHASES = (("start and join", "joined_at", "restore_at"), ("load window", "restore_at", "state_loaded_at"),
                      ("receive logs", "state_loaded_at", "logs_received_at"), ("replay", "logs_received_at", "ready_at"),
                      ("wait for all", "ready_at", "resumed_at"))
SURVIVOR_PHASES = (("wait for new group", "detected_at", "joined_at"), ("plan and serve", "joined_at", "resumed_at"))


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend; ImportError when the extra is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_and_grad_norm(iterations: list[IterationRecord], summary: RunSummary, out: Path) -> Path:
    plt = pyplot()
    by_iteration = {r.iteration: r for r in iterations}  # every rank records the same global values
    xs = sorted(by_iteration)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    top.plot(xs, [by_iteration[x].loss for x in xs], color="tab:blue")
    top.set_ylabel("loss")
    bottom.plot(xs, [by_iteration[x].grad_norm for x in xs], color="tab:orange")
    bottom.set_ylabel("grad norm (before clipping)")
    bottom.set_xlabel("iteration")
    for f in summary.failures:
        at = f.abandoned_iteration if f.abandoned_iteration is not None else f.resume
        for axis in (top, bottom):
            axis.axvline(at, color="tab:red", linestyle="--", linewidth=1)
        top.annotate(f"failure (gen {f.generation})", (at, 1.0), xycoords=("data", "axes fraction"),
                     fontsize=8, color="tab:red", va="top", ha="left")
    top.set_title("loss and gradient norm per iteration (dashed: failures)")
    return _save(fig, plt, out / "loss.png")


def iteration_time(iterations: list[IterationRecord], out: Path) -> Path:
    plt = pyplot()
    per_iteration: dict[int, list[IterationRecord]] = defaultdict(list)
    for r in iterations:
        per_iteration[r.iteration].append(r)
    xs = sorted(per_iteration)

    def mean(name: str) -> list[float]:
        return [statistics.fmean(getattr(r, name) for r in per_iteration[x]) for x in xs]

    fig, axis = plt.subplots(figsize=(8, 4))
    axis.plot(xs, mean("iteration_ms"), color="tab:gray", label="iteration")
    axis.stackplot(xs, mean("capture_ms"), mean("logging_ms"), mean("metrics_ms"),
                   labels=["capture (training thread)", "logging (training thread)", "metrics"],
                   colors=["tab:green", "tab:purple", "tab:olive"], alpha=0.8)
    axis.set_xlabel("iteration")
    axis.set_ylabel("ms (mean over ranks)")
    axis.set_title("iteration time and moetion's share of it")
    axis.legend(loc="upper right", fontsize=8)
    return _save(fig, plt, out / "iteration_time.png")


def host_memory(iterations: list[IterationRecord], out: Path) -> Path:
    plt = pyplot()
    t0 = min(r.time for r in iterations)
    fig, axis = plt.subplots(figsize=(8, 4))
    for rank in sorted({r.rank for r in iterations}):
        mine = sorted((r for r in iterations if r.rank == rank), key=lambda r: r.time)
        xs = [r.time - t0 for r in mine]
        (line,) = axis.plot(xs, [r.log_host_bytes / MiB for r in mine], label=f"rank {rank} logs")
        axis.plot(xs, [r.window_host_bytes / MiB for r in mine], linestyle=":", color=line.get_color(),
                  label=f"rank {rank} windows")
    axis.set_xlabel("seconds since the first commit")
    axis.set_ylabel("MiB held in host memory")
    axis.set_title("host memory held by upstream logs (solid) and snapshot windows (dotted)")
    axis.legend(fontsize=7, ncol=2)
    return _save(fig, plt, out / "host_memory.png")


def recovery_gantt(generation: int, records: list[RecoveryRecord], out: Path) -> Path:
    plt = pyplot()
    t0 = min(r.detected_at if r.detected_at is not None else r.joined_at for r in records)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2)
    color_of: dict[str, str] = {}
    fig, axis = plt.subplots(figsize=(10, 1.5 + 0.5 * len(records)))
    for row, r in enumerate(sorted(records, key=lambda r: r.rank)):
        phases = REPLACEMENT_PHASES if r.role == "replacement" else SURVIVOR_PHASES
        for label, start, end in phases:
            begin, finish = getattr(r, start), getattr(r, end)
            if begin is None or finish is None:
                continue
            color = color_of.setdefault(label, next(colors))
            axis.barh(row, finish - begin, left=begin - t0, color=color,
                      label=None if _labelled(axis, label) else label)
    axis.set_yticks(range(len(records)), [f"rank {r.rank} ({r.role})" for r in sorted(records, key=lambda r: r.rank)])
    axis.set_xlabel("seconds since the failure was first detected")
    axis.set_title(f"recovery of generation {generation}")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, plt, out / f"recovery-gen{generation}.png")


def _labelled(axis: Any, label: str) -> bool:
    return label in axis.get_legend_handles_labels()[1]


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
