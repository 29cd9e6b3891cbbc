"""``moetion report RUN_DIR``: a run's metrics as PNG plots and a short text summary.

The summary (``summary.txt``, also printed) needs nothing beyond moetion; the plots need the
optional extra ``pip install -e '.[plots]'`` (matplotlib). Without it the summary is still
written, with a note saying how to get the plots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moetion.metrics import read_run
from moetion.report.summary import RunSummary, iterations_of, recoveries_of, summarize

REPORT_SUBDIR = "report"
NO_MATPLOTLIB = "plots skipped: matplotlib is not installed (pip install -e '.[plots]')"


@dataclass
class Report:
    summary: RunSummary
    summary_path: Path
    plots: list[Path] = field(default_factory=list)
    note: str | None = None

    def lines(self) -> list[str]:
        out = self.summary.lines() + [f"summary: {self.summary_path}"]
        out += [f"plot: {p}" for p in self.plots]
        return out + ([self.note] if self.note else [])


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Report:
    """Reads ``run_dir``'s metrics and writes the summary and plots to ``out`` (default ``run_dir/report``)."""
    runs = read_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / REPORT_SUBDIR
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    summary = summarize(runs)
    report = Report(summary, out / "summary.txt")
    try:
        from moetion.report import plots

        plots.pyplot()
    except ImportError:
        report.note = NO_MATPLOTLIB
    else:
        iterations = iterations_of(runs)
        if iterations:
            report.plots += [plots.loss_and_grad_norm(iterations, summary, out), plots.iteration_time(iterations, out),
                             plots.host_memory(iterations, out)]
        report.plots += [plots.recovery_gantt(g, records, out) for g, records in recoveries_of(runs).items()]
    report.summary_path.write_text("\n".join(summary.lines() + ([report.note] if report.note else [])) + "\n")
    return report


def report_command(run_dir: str, out: str | None) -> int:
    """``moetion report``: prints the summary and where the files went."""
    print("\n".join(write_report(run_dir, out).lines()), flush=True)
    return 0
