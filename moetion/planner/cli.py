"""``moetion plan``: reads the description, prints the table, optionally draws the plot."""
from __future__ import annotations

import sys

from moetion.planner.calibration import load_calibration
from moetion.planner.report import PlanRow, build_rows, format_table
from moetion.planner.spec import load_spec, parse_duration


def plan_command(*, preset_name: str | None, spec: str | None, mtbf: str, runs: int = 30, seed: int = 0,
                 plot: str | None = None, quiet: bool = False, calibrate: str | None = None) -> int:
    """Prints the per-approach table for one MTBF; returns the process exit code."""
    model, hardware = load_spec(spec, preset_name=preset_name)
    mtbf_s = parse_duration(mtbf)
    calibration = load_calibration(calibrate) if calibrate else None
    if plot:  # fail on a missing matplotlib before spending time on the simulation
        from moetion.planner.plot import plot_ettr
    rows = build_rows(model, hardware, mtbf_s=mtbf_s, runs=runs, seed=seed, quiet=quiet, calibration=calibration)
    print(format_table(rows, title=f"{model.name} at MTBF {mtbf} ({mtbf_s:g} s), iteration {hardware.iteration_s:g} s"))
    if calibration is not None:
        print(calibration.describe())
    warning = mtbf_warning(rows, mtbf=mtbf, mtbf_s=mtbf_s)
    if warning:
        print(f"moetion plan: warning: {warning}", file=sys.stderr)
    if plot:
        print(f"plot: {plot_ettr(model, hardware, plot, marker_mtbf_s=mtbf_s)}")
    return 0


USEFUL_ETTR = 0.5  # below this, every approach spends more time recovering than training


def mtbf_warning(rows: list[PlanRow], *, mtbf: str, mtbf_s: float) -> str | None:
    """A warning when no approach keeps the job training half of the time: at such an MTBF the
    recommendation is meaningless, and the likeliest cause is a wrong unit (1s for 1h)."""
    best = max(rows, key=lambda row: row.ettr_analytic)
    if best.ettr_analytic >= USEFUL_ETTR:
        return None
    return (f"at MTBF {mtbf} ({mtbf_s:g} s) the best ETTR is {best.ettr_analytic:.2f} (expected recovery "
            f"{best.expected_recovery_s:.0f} s): the job would mostly recover, not train; check the unit "
            "(s, m, h, d) or fix the failures first")
