"""One failure, three ways to survive it, side by side in one run: rollback, global restart, moetion.

The job is the built-in GPT-MoE demo (fp32) on S stage processes, one thread each, for every S of
``--stages`` (default 2 4 8), each S measured the same way. Stage ``--stage`` (the last stage when S
is smaller) is SIGKILLed mid-backward in iteration ``f``; every approach runs the same model, data and kill:

  global-rollback  CheckFreq-style: every stage saves its full state (weights + Adam) to disk every
                   I iterations (synchronously, timed: C seconds per checkpoint). I is the Young/Daly
                   interval for the measured C and ``--mtbf``: I = sqrt(2 C MTBF) / t_iter. The kill
                   lands I/2 iterations after a checkpoint (the expected loss). The job dies; every
                   stage restarts (forked, like moetion's replacement), loads the checkpoint and
                   re-executes up to f.
  global-restart   GEMINI-style: every stage keeps an in-memory copy (/dev/shm) of its full state
                   after every iteration; the job dies, every stage restarts and reloads the copy of
                   the last completed iteration, and only the in-flight iteration is redone.
  moetion          sparse snapshots (W pinned, ``--window``) and upstream logging; the supervisor
                   replaces the killed stage, survivors pause in place, the replacement replays.

Per approach: wall time from the kill until training is back at iteration f; stage-iterations
re-executed; and lost stage-seconds counted two ways:
  work lost      compute thrown away and redone: every stage's in-flight iteration, plus
                 re-executed iterations (rollback: all stages x (f - checkpoint); moetion: the
                 replacement's replay);
  occupancy lost stage-seconds from the kill until each stage makes new progress again, pauses
                 included (stages x wall time, give or take each stage's own resume).
  bytes moved    state read back to resume (checkpoint files, or the window and the logs).
The >= 10x target of the issue is about work lost; occupancy is printed beside it.

Every approach runs ``--repeats`` times, interleaved; a row is the median and its spread over the
repeats (max/min - 1) is that row's A/A noise band. Then a model fed with each S's measured costs
(iteration time, in-flight loss, replay rate) extends the comparison to other checkpoint intervals,
and reports per S the interval at which rollback loses 31x moetion's work. The measured fixed
costs (of the 4-stage run, else the first S) are written as a planner calibration
(experiments/results/calibration.json).

Then an experts table (expert parallelism, DESIGN.md's EP layout): the demo on 2 stages x 2
replicas, replica 1 of stage 1 SIGKILLed mid-backward, with the same columns for two moetion rows:
  moetion, DP 2 (EP 1)   every replica holds every expert: the lost rank copies its stage's live replica
  moetion, DP 2 x EP 2   each replica holds half the experts, so the lost rank's have no other copy: it
                         replays from its window with the survivor of its expert-parallel group (which
                         reloads its own window; both re-executions count as work lost)
``--only stages`` / ``--only experts`` runs one of the two.

Prints the tables and writes experiments/results/bench_recovery.json and bench_recovery_experts.json
(and PNGs with matplotlib).

``--matrix`` instead times every cell of the fault matrix (topology x killed stage x phase x job
kind: forked, fresh interpreter, warm spare) and the steady-state cost of the failure notice with
its A/A band: see ``recovery_matrix.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import moetion
from moetion.data import ByteCorpus, stdlib_corpus
from moetion.demo import SHM_ROOT, DemoSettings, demo_engine_config, demo_model_config, rank_main
from moetion.errors import LaunchError
from moetion.env import KILLS as KILL_ENV
from moetion.env import FAULT_LOG as FAULT_LOG_ENV
from moetion.recovery.records import Role
from moetion.harness.timeline import timeline
from moetion.launcher import supervise_workers
from moetion.models import build_gpt_moe_layers, gpt_moe_loss

from measure import RESULTS, save_figure, write_results

TARGET_RATIO = 31.0
INTERVALS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGE_COUNTS = (2, 4, 8)
CALIBRATION_STAGES = 4  # the demo's topology: its fixed costs feed `moetion plan --calibrate`


def rollback_rank(settings: DemoSettings, ckpt_dir: str, interval: int, resume: bool, back_at: int) -> dict:
    """One stage of the global-rollback job: plain training plus a dense checkpoint every ``interval``."""
    model = demo_model_config()
    module = moetion.PipelineModule(build_gpt_moe_layers(model), settings.stages, loss_fn=gpt_moe_loss, seed=settings.seed)
    config = demo_engine_config(DemoSettings(**{**vars(settings), "snapshots": False}))
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=settings.lr), config=config)
    data = ByteCorpus(stdlib_corpus(), seq_len=model.seq_len, micro_batch_size=settings.micro_batch_size, seed=settings.seed)
    path = Path(ckpt_dir) / f"stage-{engine.stage}.pt"
    started = time.time()
    if resume:
        state = torch.load(path, weights_only=True)
        module.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.iteration = state["iteration"]
    loaded, saves, back_time, seconds = time.time(), [], None, []
    while engine.iteration < settings.iterations:
        if resume and engine.iteration >= back_at and back_time is None:
            back_time = time.time()  # back where the kill struck (at once for a copy of the last iteration)
        engine.train_batch(data)
        seconds.append(engine.last_stats.seconds)
        if engine.iteration % interval == 0:
            t = time.perf_counter()
            tmp = path.with_suffix(".tmp")
            torch.save({"model": module.state_dict(), "optimizer": engine.optimizer.state_dict(),
                        "iteration": engine.iteration}, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            saves.append(time.perf_counter() - t)
    engine.close()
    return {"started": started, "loaded": loaded, "back_at": back_time, "saves": saves,
            "iteration_s": sorted(seconds)[len(seconds) // 2]}


def measure_rollback(settings: DemoSettings, interval: int, kill_iteration: int, stage: int, scratch: Path,
                     approach: str = "global-rollback") -> dict:
    """Rollback to the last checkpoint in ``scratch`` (disk for CheckFreq; /dev/shm and interval 1
    for the GEMINI-style global restart)."""
    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"{approach}-", dir=scratch))
    fault_log = ckpt_dir / "kills.jsonl"
    env = {KILL_ENV: f"stage={stage},iter={kill_iteration},phase=backward", FAULT_LOG_ENV: str(fault_log)}
    stages = settings.stages
    try:
        supervise_workers(rollback_rank, nproc=stages, args=(settings, str(ckpt_dir), interval, False, -1),
                          env=env, grace_s=5.0, timeout_s=600)
        raise RuntimeError("the rollback run was supposed to die")
    except LaunchError:
        pass
    killed_at = json.loads(fault_log.read_text().splitlines()[0])["time"]
    checkpoint = torch.load(ckpt_dir / "stage-0.pt", weights_only=True)["iteration"]
    results = supervise_workers(rollback_rank, nproc=stages, args=(settings, str(ckpt_dir), interval, True, kill_iteration),
                                timeout_s=600).results
    back = max(r["back_at"] for r in results)
    iteration_s = sorted(r["iteration_s"] for r in results)[stages // 2]
    redone = kill_iteration - checkpoint
    moved = sum(p.stat().st_size for p in ckpt_dir.glob("stage-*.pt"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {"approach": approach, "checkpoint_iteration": checkpoint, "wall_s": back - killed_at, "bytes_moved": moved,
            "reexecuted_stage_iterations": stages * redone,
            # Each stage redoes f - checkpoint iterations and loses its in-flight one (about half an iteration).
            "work_lost_stage_s": stages * (redone + 0.5) * iteration_s,
            "occupancy_lost_stage_s": stages * (back - killed_at)}


def measure_moetion(settings: DemoSettings, kill: str, scratch: Path, approach: str = "moetion") -> dict:
    """One moetion run of the demo (``settings.stages`` x ``settings.data_parallel`` ranks) with the
    kill spec ``kill``. Re-executed work counts every rank that replayed: the replacement and, with
    expert parallelism, the survivors of its expert-parallel group that replay with it."""
    attempt = Path(tempfile.mkdtemp(prefix="moetion-", dir=scratch))  # a fresh fault log: each kill fires once per log
    run_id = f"bench-recovery-{os.getpid()}-{attempt.name}"
    env = {KILL_ENV: kill, FAULT_LOG_ENV: str(attempt / "kills.jsonl"), "MOETION_RUN_ID": run_id}
    try:
        report = supervise_workers(rank_main, nproc=settings.stages * settings.data_parallel, args=(settings, run_id),
                                   recover=True, env=env, timeout_s=600)
    finally:
        shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
    (recovery,) = report.recoveries
    line = timeline(recovery)
    events = recovery.rank_events.values()
    inflight = sum(e.inflight_s for e in events if e.role is Role.SURVIVOR)
    replacement = next(e for e in events if e.role is Role.REPLACEMENT)
    resumed = [e.resumed_at - recovery.killed_at for e in events]
    return {"approach": approach, "wall_s": line.total_s,
            "reexecuted_stage_iterations": line.replayed_stage_iterations + line.survivor_replayed_iterations,
            # The state each restoring rank loaded (window or live replica's state) and the logs it received.
            "bytes_moved": sum(e.window_bytes + e.bytes_received for e in events), "inflight_stage_s": inflight,
            "replay_s": replacement.replay_s, "replayed": replacement.replayed,
            "work_lost_stage_s": inflight + sum(e.replay_s for e in events), "occupancy_lost_stage_s": sum(resumed),
            "timeline": line.to_dict(), "source": replacement.source.value}


def checkpoint_cost(settings: DemoSettings, scratch: Path) -> tuple[float, float]:
    """(seconds per dense checkpoint, seconds per iteration), measured on a short run."""
    probe = scratch / f"probe-{settings.stages}"
    probe.mkdir()
    results = supervise_workers(rollback_rank, nproc=settings.stages,
                                args=(DemoSettings(**{**vars(settings), "iterations": 12}), str(probe), 2, False, -1),
                                timeout_s=600).results
    saves = sorted(s for r in results for s in r["saves"])
    return saves[len(saves) // 2], sorted(r["iteration_s"] for r in results)[settings.stages // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtbf", type=float, default=1800.0, help="job MTBF in seconds for the Young/Daly interval")
    parser.add_argument("--window", type=int, default=8, help="moetion's pinned snapshot window W")
    parser.add_argument("--stage", type=int, default=2, help="the stage to kill (the last one when there are fewer)")
    parser.add_argument("--stages", type=int, nargs="+", default=list(STAGE_COUNTS),
                        help="pipeline sizes to measure, one process with one thread per stage")
    parser.add_argument("--repeats", type=int, default=2, help="runs per approach (their spread is the noise band)")
    parser.add_argument("--only", choices=["all", "stages", "experts"], default="all",
                        help="stages: the table per pipeline size, model and calibration; experts: the 2 stages x 2 replicas "
                             "table, EP 1 vs EP 2")
    parser.add_argument("--ep-kill", type=int, default=None,
                        help="experts table: the kill's iteration (default: the stages table's; 2W with --only experts)")
    parser.add_argument("--matrix", action="store_true", help="time every cell of the fault matrix instead")
    parser.add_argument("--topology", action="append", choices=["3 stages", "4 stages", "2x2"], default=None,
                        help="--matrix: topologies to run (default all)")
    parser.add_argument("--kind", action="append", choices=["built-in, forked", "script, fresh", "script, warm spare"],
                        default=None, help="--matrix: job kinds to run (default all)")
    parser.add_argument("--notice-repeats", type=int, default=2,
                        help="--matrix: notice-on runs for the steady-state cost (0: skip)")
    parser.add_argument("--iterations", type=int, default=20, help="--matrix: iterations per steady-state run")
    args = parser.parse_args()
    if args.matrix:
        from recovery_matrix import TOPOLOGIES
        from recovery_matrix import main as matrix_main

        matrix_main(topologies=args.topology or list(TOPOLOGIES), repeats=args.notice_repeats, iterations=args.iterations,
                    kinds=args.kind or ["built-in, forked", "script, fresh", "script, warm spare"])
        return
    os.environ.setdefault("MOETION_LOG_LEVEL", "ERROR")
    kill = None
    if args.only in ("all", "stages"):
        kill = stages_part(args)
    if args.only in ("all", "experts"):
        report = experts_part(args, kill=args.ep_kill or kill or 2 * args.window)
        write_results("bench_recovery_experts", report)


def stages_part(args: argparse.Namespace) -> int:
    """A table per pipeline size, the model built on their measured costs and the calibration; returns
    the last size's kill iteration."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    memory = Path(tempfile.mkdtemp(prefix="bench-recovery-", dir="/dev/shm"))  # the global restart's in-memory copies
    try:
        measured = {stages: measure_stages(stages, args, scratch, memory) for stages in args.stages}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(memory, ignore_errors=True)
    calibrations = {stages: m["calibration"] for stages, m in measured.items()}
    curves = model_curves(calibrations, window=args.window)
    print_curves(curves, window=args.window)
    calibration = calibrations.get(CALIBRATION_STAGES) or calibrations[args.stages[0]]
    write_results("calibration", {**calibration, **overhead_from_bench_overhead()})
    write_results("bench_recovery", {"mtbf_s": args.mtbf, "window": args.window,
                                     "by_stages": {str(s): m for s, m in measured.items()}, "model": curves})
    plot_curves(curves)
    last = measured[args.stages[-1]]
    plot_timelines(last["rows"], last["runs"]["moetion"][-1], name="bench_recovery_timelines")
    return last["kill_iteration"]


def measure_stages(stages: int, args: argparse.Namespace, scratch: Path, memory: Path) -> dict:
    """The three approaches on ``stages`` stages, ``args.repeats`` times interleaved; prints the table."""
    base = DemoSettings(window=args.window, progress=False, stages=stages)
    cost, iteration_s = checkpoint_cost(base, scratch)
    interval = max(2, round(math.sqrt(2 * cost * args.mtbf) / iteration_s))
    checkpoint = 2 * interval
    kill = checkpoint + interval // 2
    victim = min(args.stage, stages - 1)
    settings = DemoSettings(**{**vars(base), "iterations": kill + 5})
    print(f"\n{stages} stages: dense checkpoint C = {cost * 1000:.1f} ms/stage, iteration {iteration_s * 1000:.0f} ms, "
          f"MTBF {args.mtbf:g} s -> Young/Daly interval I = {interval} iterations; kill stage {victim} in iteration {kill} "
          f"({interval // 2} after the checkpoint at {checkpoint}); load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {"global-rollback": [], "global-restart": [], "moetion": []}
    for repeat in range(args.repeats):
        runs["global-rollback"].append(measure_rollback(settings, interval, kill, victim, scratch))
        runs["global-restart"].append(measure_rollback(settings, 1, kill, victim, memory, "global-restart"))
        runs["moetion"].append(measure_moetion(settings, f"stage={victim},iter={kill},phase=backward", scratch))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {rows[-1]['wall_s']:.2f} s" for name, rows in runs.items()), flush=True)
    rows = [summarize_runs(name, measured) for name, measured in runs.items()]
    print_measured(rows, title=f"{stages} stages, one kill")
    moe = rows[-1]
    calibration = fixed_costs(runs["moetion"], iteration_s=iteration_s, stages=stages, checkpoint_s=cost)
    calibration["restart_s"] = rows[1]["wall_s"]  # the global restart: kill -> every rank reloaded
    print("moetion timeline (last repeat):\n  " + "\n  ".join(timeline_lines(runs["moetion"][-1])))
    return {"stages": stages, "checkpoint_s": cost, "iteration_s": iteration_s, "interval": interval,
            "kill_iteration": kill, "killed_stage": victim, "load_average": os.getloadavg()[0], "rows": rows,
            "runs": runs, "ratios": {r["approach"]: ratios(r, moe) for r in rows[:-1]}, "calibration": calibration}


# The experts table: the demo on 2 stages x 2 replicas, the killed rank's experts with (EP 1) and
# without (EP 2) a live copy on its stage's other replica.
EP_ROWS = {"moetion, DP 2 (EP 1)": 1, "moetion, DP 2 x EP 2": 2}


def experts_part(args: argparse.Namespace, *, kill: int) -> dict:
    """Replica 1 of stage 1 SIGKILLed mid-backward in iteration ``kill``: with EP 1 it heals from
    the live replica; with EP 2 its experts have no other copy, so it replays with its expert-parallel
    group from their windows and the neighbour stage's logs."""
    spec = f"stage=1,iter={kill},phase=backward,replica=1"
    print(f"experts table: demo model on 2 stages x 2 replicas, W={args.window}, kill {spec}", flush=True)
    runs: dict[str, list[dict]] = {label: [] for label in EP_ROWS}
    scratch = Path(tempfile.mkdtemp(prefix="bench-recovery-ep-"))
    try:
        for repeat in range(args.repeats):
            for label, ep_size in EP_ROWS.items():
                settings = DemoSettings(stages=2, data_parallel=2, expert_parallel=ep_size, window=args.window,
                                        iterations=kill + 5, progress=False)
                runs[label].append(measure_moetion(settings, spec, scratch, approach=label))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{name} {rows[-1]['wall_s']:.2f} s" for name, rows in runs.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [summarize_runs(name, measured) for name, measured in runs.items()]
    print_measured(rows, title="2 stages x 2 replicas, one kill (replica 1 of stage 1)")
    for label, measured in runs.items():
        print(f"{label} timeline (last repeat, restored from {measured[-1]['source']}):\n  "
              + "\n  ".join(timeline_lines(measured[-1])))
    plot_timelines(rows, runs[list(EP_ROWS)[-1]][-1], name="bench_recovery_experts_timelines")
    return {"kill": spec, "window": args.window, "rows": rows, "runs": runs}


METRICS = ("wall_s", "work_lost_stage_s", "occupancy_lost_stage_s", "bytes_moved")


def summarize_runs(approach: str, measured: list[dict]) -> dict:
    """Median of each metric over the repeats and its spread (max/min - 1): the row's A/A band."""
    row = {"approach": approach, "repeats": len(measured),
           "reexecuted_stage_iterations": measured[-1]["reexecuted_stage_iterations"]}
    for key in METRICS:
        values = [m[key] for m in measured]
        row[key] = statistics.median(values)
        row[f"{key}_band"] = (max(values) / min(values) - 1) if min(values) > 0 else 0.0
    return row


def ratios(row: dict, moe: dict) -> dict:
    return {key: row[key] / moe[key] for key in ("wall_s", "work_lost_stage_s", "occupancy_lost_stage_s")}


def print_measured(rows: list[dict], *, title: str) -> None:
    print(f"\n{title}, median of {rows[0]['repeats']} repeats (+-: spread over the repeats, the A/A band)")
    print(f"{'approach':<22} {'kill->back (s)':>16} {'re-executed':>12} {'work lost (stage-s)':>22} "
          f"{'occupancy lost (stage-s)':>26} {'MiB moved':>10}")
    for r in rows:
        print(f"{r['approach']:<22} {r['wall_s']:>8.2f} +-{r['wall_s_band'] * 100:4.0f}% {r['reexecuted_stage_iterations']:>12d} "
              f"{r['work_lost_stage_s']:>14.2f} +-{r['work_lost_stage_s_band'] * 100:4.0f}% "
              f"{r['occupancy_lost_stage_s']:>18.2f} +-{r['occupancy_lost_stage_s_band'] * 100:4.0f}% "
              f"{r['bytes_moved'] / 2**20:10.2f}")


def fixed_costs(measured: list[dict], *, iteration_s: float, stages: int, checkpoint_s: float) -> dict:
    """The measured fixed costs of a moetion recovery (medians over the repeats), for the model
    below and for ``moetion plan --calibrate``."""
    def med(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    lines = [m["timeline"] for m in measured]
    replay_rate = med([m["replayed"] / m["replay_s"] for m in measured if m["replay_s"] > 0])
    return {"format": "moetion-calibration/1", "measured_on": f"{os.cpu_count()} CPUs, {stages} stages, shared machine",
            "iteration_s": iteration_s, "stages": stages, "checkpoint_s": checkpoint_s,
            "detect_s": med([t["detect_s"] for t in lines]), "respawn_s": med([t["respawn_s"] for t in lines]),
            "rejoin_s": med([t["rejoin_s"] for t in lines]), "script_s": med([t["script_s"] for t in lines]),
            "load_s": med([t["load_s"] for t in lines]), "logs_s": med([t["logs_s"] for t in lines]),
            "recovery_s": med([t["total_s"] for t in lines]),
            "replay_iterations_per_s": replay_rate,
            "inflight_stage_s": med([m["inflight_stage_s"] for m in measured])}


def overhead_from_bench_overhead() -> dict:
    """sparse-auto's blocked CPU share of the iteration from the last bench_overhead.py run, if any."""
    path = next((p for p in (RESULTS / "bench_overhead_snapshots.json", RESULTS / "bench_overhead.json") if p.exists()), None)
    if path is None:
        return {}
    rows = json.loads(path.read_text()).get("rows", [])
    auto = next((r for r in rows if r.get("label") == "sparse-auto"), None)
    return {} if auto is None else {"overhead_fraction": auto["blocked_cpu_ms"] / auto["median_ms"]}


def model_curves(calibrations: dict[int, dict], *, window: int) -> list[dict]:
    """Expected work lost per failure (stage-seconds) at checkpoint interval I, for each measured
    number of stages S, the kill landing uniformly within an interval:
      rollback:        S * (I/2 + 1/2) * t          (every stage redoes half an interval and its in-flight iteration)
      global restart:  S * ((I-1)/2 + 1/2) * t      (an in-memory copy every I iterations; I = 1 is GEMINI's best case)
      moetion:         S * 1/2 * t * inflight_share + 3/2 * (W - 1) * t_replay
    where t is the iteration time measured at S stages, the in-flight share is what survivors
    really lost (measured at S), and t_replay the replay time of one stage-iteration (measured at S).
    The replacement replays from the start of the last *complete* window: W - 1 + p iterations for a
    kill p iterations into the window in progress (measured: 7 at p = 0, 12 at p = 5, W = 8), on
    average 3/2 (W - 1)."""
    curves = []
    for stages, cal in sorted(calibrations.items()):
        t = cal["iteration_s"]
        rate = cal["replay_iterations_per_s"] or 1 / t
        inflight_share = cal["inflight_stage_s"] / (stages * 0.5 * t) if cal["inflight_stage_s"] else 1.0
        replay = 1.5 * (window - 1) / rate
        moe = stages * 0.5 * t * inflight_share + replay
        for interval in INTERVALS:
            rollback = stages * (interval / 2 + 0.5) * t
            restart = stages * ((interval - 1) / 2 + 0.5) * t
            curves.append({"stages": stages, "interval": interval, "rollback_stage_s": rollback,
                           "restart_stage_s": restart, "moetion_stage_s": moe,
                           "rollback_ratio": rollback / moe, "restart_ratio": restart / moe})
    return curves


def print_curves(curves: list[dict], *, window: int) -> None:
    print(f"\nmodel from the measured fixed costs: work lost per failure, rollback (and global restart) / moetion "
          f"(W={window}), by checkpoint interval")
    measured = sorted({c["stages"] for c in curves})
    print(f"{'interval':>8} " + " ".join(f"{f'{s} stages':>22}" for s in measured))
    for interval in INTERVALS:
        cells = [c for c in curves if c["interval"] == interval]
        print(f"{interval:>8} " + " ".join(f"{c['rollback_ratio']:9.1f}x ({c['restart_ratio']:6.1f}x)" for c in cells))
    for stages in measured:
        reached = [c["interval"] for c in curves if c["stages"] == stages and c["rollback_ratio"] >= TARGET_RATIO]
        where = f"from interval {reached[0]}" if reached else f"not within intervals <= {INTERVALS[-1]}"
        print(f"{stages} stages: rollback loses >= {TARGET_RATIO:.0f}x moetion's work {where}")


PHASES = (("detect_s", "detected"), ("respawn_s", "respawned"), ("rejoin_s", "rejoined"), ("script_s", "script"),
          ("load_s", "window loaded"), ("logs_s", "logs received"), ("replay_s", "replayed"))


def plot_timelines(rows: list[dict], moe: dict, *, name: str) -> None:
    """Kill -> back per row side by side, the last row's (``moe``, a moetion run) split into its recovery phases."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axis = plt.subplots(figsize=(10, 2.8))
    for y, row in enumerate(rows[:-1]):
        axis.barh(y, row["wall_s"], xerr=row["wall_s"] * row["wall_s_band"] / 2, color="grey")
    left, y = 0.0, len(rows) - 1
    for key, label in PHASES:
        width = moe["timeline"].get(key) or 0.0
        axis.barh(y, width, left=left, label=label)
        left += width
    axis.set_yticks(range(len(rows)), [r["approach"] for r in rows])
    axis.set_xlabel("seconds from the kill until back at the killed iteration")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title=f"{rows[-1]['approach']} (last repeat)")
    save_figure(fig, name)


def plot_curves(curves: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axis = plt.subplots(figsize=(6, 4))
    for stages in sorted({c["stages"] for c in curves}):
        cells = [c for c in curves if c["stages"] == stages]
        axis.plot([c["interval"] for c in cells], [c["rollback_ratio"] for c in cells], marker="o", label=f"rollback, {stages} stages")
        axis.plot([c["interval"] for c in cells], [c["restart_ratio"] for c in cells], linestyle="--",
                  label=f"global restart, {stages} stages")
    axis.axhline(TARGET_RATIO, color="grey", linestyle=":", label=f"{TARGET_RATIO:.0f}x")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("checkpoint interval (iterations)")
    axis.set_ylabel("work lost / moetion's")
    axis.legend(fontsize=7)
    save_figure(fig, "bench_recovery_model")


def timeline_lines(row: dict) -> list[str]:
    t = row["timeline"]
    names = [("detect_s", "detected"), ("respawn_s", "respawned"), ("rejoin_s", "rejoined the group"),
             ("script_s", "script reached train_batch"), ("load_s", f"window loaded ({row['source']})"),
             ("logs_s", "logs received"), ("replay_s", "replayed"), ("total_s", "kill -> all resumed")]
    return [f"{label:<28} {t[key] * 1000:7.0f} ms" for key, label in names if t.get(key) is not None]


if __name__ == "__main__":
    main()
