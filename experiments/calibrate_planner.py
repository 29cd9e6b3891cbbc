"""Does `moetion plan`'s model predict what moetion really does? Calibrate it on the demo, then test it.

The planner's ETTR for localized recovery is

    ETTR = 1 / (1 + overhead) * 1 / (1 + E[R] / MTBF),   E[R] = fixed + (W + W/2) * t_replay

Every input is measured here, on separate runs from the one it is tested on (demo model, 4 stage
processes, fp32, W pinned to ``--window``):

  A  no fault tolerance, no failure      -> t_iter (the useful time of one iteration)
  B  moetion, no failure                 -> overhead = t_iter(B) / t_iter(A) - 1
  D  moetion, one failure                -> fixed recovery (kill -> resumed, minus replay) and
                                            t_replay (replay seconds per replayed stage-iteration)
  C  moetion, ``--failures`` kills at seeded random iterations of stages 1..3 (stage 0 keeps the
     clock) -> measured ETTR = training wall time of A / training wall time of C,
     MTBF = wall time of C / failures; the prediction uses that MTBF and the figures of A, B, D.

Prints prediction vs measurement (and the Monte-Carlo simulator's 95% interval for the same
costs) and writes experiments/results/calibrate_planner.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

from moetion.demo import SHM_ROOT, DemoSettings, rank_main
from moetion.env import KILLS as KILL_ENV
from moetion.env import FAULT_LOG as FAULT_LOG_ENV
from moetion.harness.timeline import timeline
from moetion.launcher import supervise_workers
from moetion.planner.cost import ApproachCost
from moetion.planner.ettr import analytic_ettr, simulate_ettr

RESULTS = Path(__file__).parent / "results"


def run(settings: DemoSettings, kills: list[str], tag: str) -> tuple[dict, list]:
    run_id = f"calibrate-{tag}-{os.getpid()}"
    env = {"MOETION_RUN_ID": run_id, FAULT_LOG_ENV: f"/tmp/{run_id}-kills.jsonl"}
    if kills:
        env[KILL_ENV] = ";".join(kills)
    try:
        report = supervise_workers(rank_main, nproc=settings.stages, args=(settings, run_id), recover=True,
                                   env=env, timeout_s=900)
    finally:
        shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
        Path(env[FAULT_LOG_ENV]).unlink(missing_ok=True)
    return report.results[0], [timeline(r) for r in report.recoveries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--failures", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "ERROR")
    base = DemoSettings(iterations=args.iterations, window=args.window, progress=False)

    plain, _ = run(DemoSettings(**{**vars(base), "snapshots": False}), [], "A")
    t_iter = plain["median_iteration_s"]
    protected, _ = run(base, [], "B")
    overhead = protected["median_iteration_s"] / t_iter - 1
    _, (single,) = run(DemoSettings(**{**vars(base), "iterations": 40}), ["stage=2,iter=30,phase=backward"], "D")
    fixed = single.total_s - single.replay_s
    t_replay = single.replay_s / max(1, single.replayed_stage_iterations)

    rng = random.Random(args.seed)
    iterations = sorted(rng.sample(range(10, args.iterations - 5, 7), args.failures))
    kills = [f"stage={rng.randint(1, 3)},iter={t},phase=backward" for t in iterations]
    faulty, recoveries = run(base, kills, "C")
    wall = faulty["wall_s"]
    measured = plain["wall_s"] / wall  # the same iterations without fault tolerance or failures
    mtbf = wall / args.failures

    cost = ApproachCost(
        approach="moetion (calibrated)", interval=args.window, interval_kind="W", iteration_s=t_iter,
        checkpoint_stall_s=max(0.0, overhead) * t_iter * args.window, snapshot_bytes_per_iteration=0.0,
        log_bytes_per_iteration=0.0, host_memory_bytes=0.0, fixed_recovery_s=fixed,
        replay_base_iterations=args.window, replay_speedup=t_iter * (1 + max(0.0, overhead)) / t_replay,
    )
    predicted = analytic_ettr(cost, mtbf_s=mtbf)
    simulated = simulate_ettr(cost, mtbf_s=mtbf, runs=200, horizon_failures=50, seed=args.seed)
    measured_recovery = sum(t.total_s for t in recoveries if not t.superseded) / len(recoveries)

    print(f"t_iter {t_iter * 1000:.0f} ms (no FT), overhead {overhead * 100:+.1f}% (W={args.window}), "
          f"fixed recovery {fixed:.2f} s, replay {t_replay * 1000:.0f} ms per stage-iteration "
          f"(speed-up {cost.replay_speedup:.2f}x)")
    print(f"faulty run: kills {kills}; {args.iterations} iterations in {wall:.1f} s -> MTBF {mtbf:.1f} s")
    print(f"\n{'':<28} {'predicted':>10} {'measured':>10}")
    print(f"{'E[recovery] (s)':<28} {cost.expected_recovery_s:>10.2f} {measured_recovery:>10.2f}")
    print(f"{'ETTR':<28} {predicted:>10.3f} {measured:>10.3f}")
    print(f"simulated ETTR {simulated.mean:.3f} (95% CI {simulated.ci_low:.3f}-{simulated.ci_high:.3f}); "
          f"prediction error {predicted - measured:+.3f} ({(predicted - measured) / measured * 100:+.1f}%)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "calibrate_planner.json"
    out.write_text(json.dumps({
        "iteration_s": t_iter, "overhead": overhead, "fixed_recovery_s": fixed, "replay_s_per_iteration": t_replay,
        "kills": kills, "wall_s": wall, "wall_no_ft_s": plain["wall_s"], "mtbf_s": mtbf, "measured_ettr": measured, "predicted_ettr": predicted,
        "simulated_ettr": [simulated.mean, simulated.ci_low, simulated.ci_high],
        "expected_recovery_s": cost.expected_recovery_s, "measured_recovery_s": measured_recovery,
        "recoveries": [t.to_dict() for t in recoveries]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
