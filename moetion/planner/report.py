"""The plan table: one row per approach, and the recommendation drawn from it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from moetion.planner.calibration import Calibration, calibrate_costs, calibrate_hardware
from moetion.planner.cost import EP_LOG_APPROACH, HardwareSpec, ModelSpec, plan_approaches
from moetion.planner.ettr import analytic_ettr, simulate_ettr
from moetion.progress import track

_LABELS = {"moevement": "MoEvement (sparse)", "checkfreq": "CheckFreq (disk)", "gemini": "Gemini (peer mem)",
           "moc": "MoC (partial experts)", EP_LOG_APPROACH: "MoEvement, a2a log (b)"}


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """Everything the table shows for one approach (also the JSON written by reproduce_paper)."""

    approach: str
    overhead_pct: float
    interval_kind: str
    interval: int
    expected_recovery_s: float
    worst_recovery_s: float
    host_memory_gb: float
    snapshot_gb_per_iteration: float
    log_gb_per_iteration: float
    ettr_analytic: float
    ettr_simulated: float | None
    ettr_ci_half_width: float | None
    lost_tokens_fraction: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def build_rows(model: ModelSpec, hardware: HardwareSpec, *, mtbf_s: float, runs: int = 30,
               seed: int = 0, horizon_failures: float = 300.0, quiet: bool = True,
               calibration: Calibration | None = None) -> list[PlanRow]:
    """Costs, analytic ETTR and (when ``runs`` > 0) simulated ETTR for every approach (with a
    progress bar on a terminal unless ``quiet``); with a ``calibration``, measured fixed costs
    replace the assumed ones."""
    if calibration is not None:
        hardware = calibrate_hardware(hardware, calibration)
    costs = plan_approaches(model, hardware, mtbf_s=mtbf_s)
    if calibration is not None:
        costs = calibrate_costs(costs, calibration)
    rows = []
    for offset, name in enumerate(track(list(costs), desc="plan: simulating", quiet=quiet or runs == 0)):
        cost = costs[name]
        sim = (simulate_ettr(cost, mtbf_s=mtbf_s, runs=runs, seed=seed + offset, horizon_failures=horizon_failures)
               if runs > 0 else None)
        rows.append(PlanRow(
            approach=name, overhead_pct=100 * cost.overhead_fraction, interval_kind=cost.interval_kind,
            interval=cost.interval, expected_recovery_s=cost.expected_recovery_s,
            worst_recovery_s=cost.worst_recovery_s, host_memory_gb=cost.host_memory_bytes / 1e9,
            snapshot_gb_per_iteration=cost.snapshot_bytes_per_iteration / 1e9,
            log_gb_per_iteration=cost.log_bytes_per_iteration / 1e9,
            ettr_analytic=analytic_ettr(cost, mtbf_s=mtbf_s),
            ettr_simulated=sim.mean if sim else None, ettr_ci_half_width=sim.half_width if sim else None,
            lost_tokens_fraction=cost.lost_tokens_fraction,
        ))
    return rows


def recommend(rows: list[PlanRow]) -> str:
    """The approach with the best ETTR among those that lose no training state (MoC loses tokens)."""
    exact = [row for row in rows if not row.lost_tokens_fraction]
    best = max(exact, key=lambda row: row.ettr_simulated if row.ettr_simulated is not None else row.ettr_analytic)
    setting = f"W = {best.interval}" if best.interval_kind == "W" else f"checkpoint every {best.interval} iterations"
    return (f"recommended: {_LABELS[best.approach]} with {setting} (overhead {best.overhead_pct:.1f}%, "
            f"E[recovery] {best.expected_recovery_s:.0f} s, host memory {best.host_memory_gb:.1f} GB per GPU)")


def format_table(rows: list[PlanRow], *, title: str = "") -> str:
    """A fixed-width text table plus the recommendation line."""
    header = (f"{'approach':<22} {'overhead':>8} {'W / I':>8} {'E[rec] s':>9} {'worst s':>8} "
              f"{'host GB':>8} {'ETTR':>6} {'ETTR sim (95% CI)':>19} {'lost tokens':>11}")
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for row in rows:
        sim = (f"{row.ettr_simulated:.3f} ± {row.ettr_ci_half_width:.3f}" if row.ettr_simulated is not None else "-")
        lost = f"{row.lost_tokens_fraction:.2%}" if row.lost_tokens_fraction is not None else "0"
        lines.append(
            f"{_LABELS[row.approach]:<22} {row.overhead_pct:>7.1f}% {row.interval_kind + '=' + str(row.interval):>8} "
            f"{row.expected_recovery_s:>9.1f} {row.worst_recovery_s:>8.1f} {row.host_memory_gb:>8.1f} "
            f"{row.ettr_analytic:>6.3f} {sim:>19} {lost:>11}"
        )
    lines.append(recommend(rows))
    return "\n".join(lines)
