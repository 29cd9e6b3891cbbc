"""``moetion plan``: reads the description, prints the table, optionally draws the plot."""
from __future__ import annotations

from moetion.planner.calibration import load_calibration
from moetion.planner.report import build_rows, format_table
from moetion.planner.spec import load_spec, parse_duration


def plan_command(*, preset_name: str | None, spec: str | None, mtbf: str, runs: int = 30, seed: int = 0,
                 plot: str | None = None, calibrate: str | None = None) -> int:
    """Prints the per-approach table for one MTBF; returns the process exit code."""
    model, hardware = load_spec(spec, preset_name=preset_name)
    mtbf_s = parse_duration(mtbf)
    calibration = load_calibration(calibrate) if calibrate else None
    if plot:  # fail on a missing matplotlib before spending time on the simulation
        from moetion.planner.plot import plot_ettr
    rows = build_rows(model, hardware, mtbf_s=mtbf_s, runs=runs, seed=seed, calibration=calibration)
    print(format_table(rows, title=f"{model.name} at MTBF {mtbf} ({mtbf_s:g} s), iteration {hardware.iteration_s:g} s"))
    if calibration is not None:
        print(calibration.describe())
    if plot:
        print(f"plot: {plot_ettr(model, hardware, plot, marker_mtbf_s=mtbf_s)}")
    return 0
