"""The fault matrix, timed: ``bench_recovery.py --matrix``.

Cells: topology (3 stages, 4 stages, 2 stages x 2 replicas) x killed stage (first, middle, last) x
phase (forward, backward, step) x job kind: the built-in model with forked replacements, and a
user script whose replacements are fresh interpreters (``--spares 0``) or warm spares (one spare).
One run per topology and job kind holds all nine kills of its cells, two iterations apart (each
kill is its own recovery, hence its own row); ``peer_timeout_s`` is 600 s, far above any run, so a
survivor that waited for a timeout would show as a ~600 s row.

Per cell, milliseconds from the kill: detected by the supervisor -> every survivor paused (its wait
abandoned; with the reason it recorded) -> replacement ready (in the new group; how it started) ->
window loaded -> logs received -> replayed -> every rank resumed.

Then the steady-state cost of the failure notice: the built-in model's median iteration time with
the notice on and off, runs interleaved off/on/off/on/off, and the A/A band (the spread of the
off runs) printed beside it. Writes experiments/results/bench_recovery_matrix.json.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from moetion.demo import SHM_ROOT, DemoSettings, rank_main
from moetion.env import FAILURE_NOTICE as DISABLE_ENV
from moetion.env import KILLS as KILL_ENV
from moetion.env import FAULT_LOG as FAULT_LOG_ENV
from moetion.harness.timeline import timeline
from moetion.launcher import launch_script, supervise_workers
from moetion.recovery.records import Role

RESULTS = Path(__file__).parent / "results"
PEER_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 1200.0
TOPOLOGIES = {"3 stages": (3, 1), "4 stages": (4, 1), "2x2": (2, 2)}
PHASES = ("forward", "backward", "step")
SCRIPT = textwrap.dedent('''
    import sys, torch, moetion
    from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
    stages, iterations = int(sys.argv[2]), int(sys.argv[3])
    model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_hidden=16, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), stages, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 3, "peer_timeout_s": float(sys.argv[4]),
        "snapshot": {"enabled": True, "window": 2, "shm_dir": sys.argv[1]}, "upstream_log": {"enabled": True}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    while engine.iteration < iterations:
        engine.train_batch(data)
    engine.close()
''')


def cell_kills(stages: int) -> list[tuple[str, str]]:
    """(cell name, kill spec) for first/middle/last x forward/backward/step, two iterations apart."""
    positions = {"first": 0, "middle": stages // 2, "last": stages - 1}
    cells = [(f"{where}/{phase}", stage, phase) for where, stage in positions.items() for phase in PHASES]
    return [(name, f"stage={stage},iter={2 + 2 * i},phase={phase}") for i, (name, stage, phase) in enumerate(cells)]


def run_matrix(topology: str, kind: str, scratch: Path) -> list[dict]:
    stages, replicas = TOPOLOGIES[topology]
    cells = cell_kills(stages)
    iterations = 2 + 2 * len(cells) + 2
    run_id = f"bench-matrix-{os.getpid()}-{len(list(scratch.iterdir()))}"
    env = {KILL_ENV: ";".join(spec for _, spec in cells), FAULT_LOG_ENV: str(scratch / f"{run_id}.jsonl"),
           "MOETION_RUN_ID": run_id}
    try:
        if kind == "built-in, forked":
            settings = DemoSettings(stages=stages, data_parallel=replicas, iterations=iterations, window=2,
                                    micro_batches=2, progress=False, peer_timeout_s=PEER_TIMEOUT_S)
            report = supervise_workers(rank_main, nproc=stages * replicas, args=(settings, run_id), recover=True,
                                       env=env, timeout_s=JOB_TIMEOUT_S, max_restarts=len(cells) + 2)
        else:
            script = scratch / "matrix_script.py"
            script.write_text(SCRIPT)
            report = launch_script(str(script), [str(scratch / run_id), str(stages), str(iterations), str(PEER_TIMEOUT_S)],
                                   nproc=stages * replicas, recover=True, env=env, timeout_s=JOB_TIMEOUT_S,
                                   spares=1 if kind == "script, warm spare" else 0, max_restarts=len(cells) + 2)
    finally:
        shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
    return [_row(name, recovery) for (name, _), recovery in zip(cells, report.recoveries)]


def _row(cell: str, recovery) -> dict:
    t = timeline(recovery)
    survivors = [e for e in recovery.rank_events.values() if e.role is Role.SURVIVOR]
    reasons = sorted({_reason_kind(e.cause) for e in survivors})
    if t.superseded or t.total_s is None:
        return {"cell": cell, "superseded": True, "reasons": reasons}
    ready = (t.detect_s or 0.0) + t.respawn_s + t.rejoin_s + t.script_s
    return {"cell": cell, "superseded": False, "reasons": reasons, "kinds": sorted(set(t.kinds.values())),
            "detected_ms": 1000 * (t.detect_s or 0.0), "paused_ms": 1000 * (t.paused_s or 0.0),
            "ready_ms": 1000 * ready, "loaded_ms": 1000 * (ready + t.load_s),
            "logs_ms": 1000 * (ready + t.load_s + t.logs_s),
            "replayed_ms": 1000 * (ready + t.load_s + t.logs_s + t.replay_s), "resumed_ms": 1000 * t.total_s}


def _reason_kind(cause: str) -> str:
    if re.match(r"generation \d+ published", cause):
        return "notice"
    if "no answer within" in cause:
        return "TIMEOUT"
    return "other: " + cause[:60]


def steady_state_cost(repeats: int, iterations: int) -> dict:
    """Median iteration time of the built-in model (4 stages, forked, supervised, no kill), with the
    notice off and on, interleaved; the A/A band is the spread of the off runs."""
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(2 * repeats + 1):
        mode = "off" if i % 2 == 0 else "on"
        run_id = f"bench-notice-{os.getpid()}-{i}"
        env = {"MOETION_RUN_ID": run_id, **({DISABLE_ENV: "0"} if mode == "off" else {})}
        settings = DemoSettings(iterations=iterations, window=4, micro_batches=4, progress=False)
        try:
            results = supervise_workers(rank_main, nproc=4, args=(settings, run_id), recover=True, env=env,
                                        timeout_s=JOB_TIMEOUT_S).results
        finally:
            shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
        runs[mode].append(statistics.median(r["median_iteration_s"] for r in results))
        print(f"  notice {mode}: median iteration {runs[mode][-1] * 1000:.1f} ms", flush=True)
    off = statistics.mean(runs["off"])
    band = (max(runs["off"]) - min(runs["off"])) / off
    cost = statistics.mean(runs["on"]) / off - 1
    return {"runs": runs, "aa_band": band, "on_vs_off": cost, "inside_band": abs(cost) <= band}


def print_table(topology: str, kind: str, rows: list[dict]) -> None:
    print(f"\n{topology}, {kind}: ms from the kill")
    print(f"  {'cell':<16} {'detected':>8} {'paused':>7} {'ready':>7} {'loaded':>7} {'logs':>7} {'replayed':>8} "
          f"{'resumed':>8}  replacement / survivors' reason")
    for row in rows:
        if row["superseded"]:
            print(f"  {row['cell']:<16} superseded by the next failure; reasons {row['reasons']}")
            continue
        print(f"  {row['cell']:<16} {row['detected_ms']:>8.0f} {row['paused_ms']:>7.0f} {row['ready_ms']:>7.0f} "
              f"{row['loaded_ms']:>7.0f} {row['logs_ms']:>7.0f} {row['replayed_ms']:>8.0f} {row['resumed_ms']:>8.0f}"
              f"  {','.join(row['kinds'])} / {','.join(row['reasons'])}")


def main(*, topologies: list[str], kinds: list[str], repeats: int, iterations: int) -> None:
    os.environ.setdefault("MOETION_LOG_LEVEL", "ERROR")
    scratch = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    results: dict = {"cells": {}, "machine": f"{os.cpu_count()} cores, shared", "python": sys.version.split()[0]}
    try:
        for topology in topologies:
            for kind in kinds:
                rows = run_matrix(topology, kind, scratch)
                results["cells"][f"{topology} / {kind}"] = rows
                print_table(topology, kind, rows)
        if repeats:
            print("\nsteady-state cost of the failure notice (built-in model, 4 stages, forked):", flush=True)
            cost = steady_state_cost(repeats, iterations)
            results["steady_state"] = cost
            print(f"  on vs off {cost['on_vs_off']:+.1%}, A/A band (off vs off) {cost['aa_band']:.1%}: "
                  f"{'inside' if cost['inside_band'] else 'OUTSIDE'} the band")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    paused = [r["paused_ms"] for rows in results["cells"].values() for r in rows if not r["superseded"]]
    if paused:
        print(f"\nkill -> all survivors paused: max {max(paused):.0f} ms over {len(paused)} cells "
              f"(target <= 1000 ms: {'met' if max(paused) <= 1000 else 'NOT met'})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_recovery_matrix.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
