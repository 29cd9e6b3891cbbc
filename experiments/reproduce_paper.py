"""Reproduces the shape of the paper's ETTR comparison with the planner's presets.

Runs every preset at MTBF 10 min (and a sweep), prints our table beside the paper's published
DeepSeek-MoE figures, says which of our assumptions explains each difference, and writes JSON (and
PNG plots when matplotlib is installed) to experiments/results/ (git-ignored).

    .venv/bin/python experiments/reproduce_paper.py [--runs 30]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moetion.planner import PRESETS, build_rows, format_table, preset

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP_S = (300, 600, 1200, 3600, 14400)
# The paper's DeepSeek-MoE numbers at MTBF 10 min (ETTR) and its expected-recovery range.
PAPER_ETTR = {"moevement": (0.951, 0.964), "checkfreq": (0.672, 0.672), "gemini": (0.728, 0.728), "moc": (0.134, 0.134)}
PAPER_RECOVERY_S = {"moevement": (117, 241), "checkfreq": (9402, 13086)}
WHY = {
    "moevement": "ours: respawn 30 s (guess) + 1.5 W x 0.6 s; replay at full iteration speed",
    "checkfreq": "ours: blocking write at 0.5 GB/s/GPU (guess), 120 s restart (guess); paper's CheckFreq "
                 "pipelines the write through host memory, which lowers its stall",
    "gemini": "ours: 3 GB/s/GPU of the network left for checkpoints (guess) -> Young/Daly interval, not every iteration",
    "moc": "ours counts only time (lost tokens reported separately); the paper's 0.134 presumably charges the "
           "accuracy cost of dropped expert state, which a time-only model cannot reproduce",
}
RECOVERY_NOTE = ("paper recovery figures (117-241 s vs 9,402-13,086 s) are far above our per-failure E[R] for "
                 "CheckFreq; we read them as totals over the evaluated run, not per failure (an assumption)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict = {"mtbf_10m": {}, "sweep": {}}
    for name in PRESETS:
        model, hardware = preset(name)
        rows = build_rows(model, hardware, mtbf_s=600, runs=args.runs)
        out["mtbf_10m"][name] = [row.as_dict() for row in rows]
        print(format_table(rows, title=f"\n== {name} at MTBF 10 min =="))
        out["sweep"][name] = {str(m): {row.approach: row.ettr_analytic for row in build_rows(model, hardware, mtbf_s=m, runs=0)}
                              for m in SWEEP_S}
    print("\n== DeepSeek-MoE at MTBF 10 min: ours vs paper ==")
    print(f"{'approach':<10} {'ETTR ours':>9} {'sim':>6} {'paper':>12} {'E[R] ours s':>11} {'paper R s':>12}  why they differ")
    for row in out["mtbf_10m"]["deepseek-moe-16b"]:
        lo, hi = PAPER_ETTR[row["approach"]]
        paper = f"{lo:.3f}" if lo == hi else f"{lo:.3f}-{hi:.3f}"
        rec = PAPER_RECOVERY_S.get(row["approach"])
        rec_text = f"{rec[0]:,}-{rec[1]:,}" if rec else "-"
        inside = lo - 0.02 <= row["ettr_analytic"] <= hi + 0.02
        print(f"{row['approach']:<10} {row['ettr_analytic']:>9.3f} {row['ettr_simulated']:>6.3f} {paper:>12} "
              f"{row['expected_recovery_s']:>11.0f} {rec_text:>12}  {'matches' if inside else WHY[row['approach']]}")
    print(RECOVERY_NOTE)
    low = {name: out["sweep"][name]["600"]["moevement"] for name in PRESETS}
    print("MoEvement ETTR at 10 min per preset (paper: >= 0.94):", {k: round(v, 3) for k, v in low.items()})
    print("sweep (analytic ETTR by MTBF s):")
    for name, sweep in out["sweep"].items():
        print(f"  {name}: " + "; ".join(f"{m}s " + " ".join(f"{a[:4]}={v:.2f}" for a, v in e.items()) for m, e in sweep.items()))
    out["paper"] = {"ettr_mtbf_10m": PAPER_ETTR, "recovery_s": PAPER_RECOVERY_S, "why": WHY, "recovery_note": RECOVERY_NOTE}
    path = RESULTS / "reproduce_paper.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    try:
        from moetion.planner.plot import plot_ettr

        for name in PRESETS:
            print(f"wrote {plot_ettr(*preset(name), RESULTS / f'ettr_vs_mtbf_{name}.png', marker_mtbf_s=600)}")
    except Exception as error:  # noqa: BLE001 - plots are optional (matplotlib is an extra)
        print(f"plots skipped: {error}")


if __name__ == "__main__":
    main()
