"""What writing per-rank metrics costs the training thread: metrics on vs off, against an A/A band.

The demo model on --stages stage processes, sparse snapshots (W pinned) and upstream logging on in
every row, so the only difference is ``metrics.dir``. Rows, interleaved within every round (their
order rotates per round) so machine noise hits all alike:

  off     metrics off (the baseline)
  off-2   metrics off again: off vs off-2 is the A/A comparison; its spread is the noise band
  on      metrics on (every rank writes its JSON lines)

A row's figure is the median, over rounds, of each run's median iteration time on stage 0 (the
first --warmup iterations of a run excluded). The noise band is the A/A spread of those figures,
|off-2 / off - 1|: "on" is within noise when |on / off - 1| is no larger. The largest off vs off-2
difference within a single round is printed too, as a measure of how noisy the machine was. The direct cost comes from timestamps the training thread took
itself: each iteration line's ``metrics_ms`` (the writer's own time, measured around the write
with ``time.perf_counter`` on the training thread), over every rank of every "on" run.

Prints the table and writes experiments/results/bench_metrics.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

import moetion
from moetion.data import stdlib_corpus
from moetion.demo import SHM_ROOT, demo_model_config
from moetion.launcher import run_workers
from moetion.metrics import IterationRecord, read_run
from moetion.models import build_gpt_moe_layers, gpt_moe_loss

RESULTS = Path(__file__).parent / "results"
ROWS = ("off", "off-2", "on")


def rank_main(args: argparse.Namespace, run_id: str, metrics_dir: str | None) -> list[float]:
    """One rank of one run; returns its iteration seconds."""
    model = demo_model_config()
    module = moetion.PipelineModule(build_gpt_moe_layers(model), args.stages, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=3e-3), config={
        "micro_batches": 4,
        "snapshot": {"enabled": True, "window": args.window, "run_id": run_id, "shm_dir": SHM_ROOT},
        "upstream_log": {"enabled": True},
        "metrics": {"dir": metrics_dir},
    })
    data = moetion.ByteCorpus(stdlib_corpus(), seq_len=model.seq_len, micro_batch_size=8)
    seconds = []
    while engine.iteration < args.iterations:
        engine.train_batch(data)
        seconds.append(engine.last_stats.seconds)
    engine.close()
    return seconds


def one_run(args: argparse.Namespace, row: str, round_: int, scratch: Path) -> tuple[float, list[float]]:
    """(stage 0's median iteration ms, every rank's metrics_ms per iteration if metrics were on)."""
    run_id = f"bench-metrics-{os.getpid()}-{row}-{round_}"
    metrics_dir = str(scratch / run_id) if row == "on" else None
    try:
        results = run_workers(rank_main, nproc=args.stages, args=(args, run_id, metrics_dir))
    finally:
        shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
    median_ms = statistics.median(results[0][args.warmup:]) * 1e3
    writes = []
    if metrics_dir is not None:
        writes = [r.metrics_ms for records in read_run(metrics_dir).values() for r in records
                  if isinstance(r, IterationRecord) and r.iteration >= args.warmup]
    return median_ms, writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--window", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "WARNING")
    torch.set_num_threads(1)  # the parent forks ranks: no OpenMP pool of its own
    scratch = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    per_row: dict[str, list[float]] = {row: [] for row in ROWS}
    writes: list[float] = []
    try:
        for round_ in range(args.rounds):
            order = ROWS[round_ % len(ROWS):] + ROWS[:round_ % len(ROWS)]
            for row in order:
                median_ms, row_writes = one_run(args, row, round_, scratch)
                per_row[row].append(median_ms)
                writes += row_writes
                print(f"round {round_ + 1}/{args.rounds} {row:6s} {median_ms:7.1f} ms/iteration", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = statistics.median(per_row["off"])
    band = abs(statistics.median(per_row["off-2"]) / base - 1)
    worst_round = max(abs(a - b) / a for a, b in zip(per_row["off"], per_row["off-2"]))
    summary = {
        "rows": {row: {"ms_per_iteration": statistics.median(v), "x_off": statistics.median(v) / base, "rounds": v}
                 for row, v in per_row.items()},
        "noise_band": band,
        "worst_round_spread": worst_round,
        "metrics_ms_per_iteration": {"mean": statistics.fmean(writes), "median": statistics.median(writes),
                                     "p99": sorted(writes)[int(0.99 * (len(writes) - 1))], "max": max(writes),
                                     "samples": len(writes)},
        "settings": vars(args),
    }
    on = summary["rows"]["on"]["x_off"]
    print(f"\n{'row':8s} {'ms/iter':>8s} {'x off':>7s}")
    for row, figures in summary["rows"].items():
        print(f"{row:8s} {figures['ms_per_iteration']:8.1f} {figures['x_off']:7.3f}")
    w = summary["metrics_ms_per_iteration"]
    print(f"A/A noise band (off-2 vs off): ±{band:.1%}; metrics on: {on - 1:+.1%} "
          f"({'inside' if abs(on - 1) <= band else 'OUTSIDE'} the band); the worst single round's off vs off-2 "
          f"differed by {worst_round:.1%}")
    print(f"training thread writing metrics, per iteration and rank: mean {w['mean']:.3f} ms, median "
          f"{w['median']:.3f} ms, p99 {w['p99']:.3f} ms, max {w['max']:.3f} ms ({w['samples']} samples) = "
          f"{w['mean'] / base:.3%} of an iteration")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_metrics.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
