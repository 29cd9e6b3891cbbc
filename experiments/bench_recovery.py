"""One failure, two ways to survive it, side by side in one run: global rollback vs moetion.

The job is the built-in GPT-MoE demo on 4 stage processes (fp32). Stage ``--stage`` is SIGKILLed
mid-backward in iteration ``f``; both approaches run the same model, data and kill:

  global-rollback  CheckFreq-style: every stage saves its full state (weights + Adam) to disk every
                   I iterations (synchronously, timed: C seconds per checkpoint). I is the Young/Daly
                   interval for the measured C and ``--mtbf``: I = sqrt(2 C MTBF) / t_iter. The kill
                   lands I/2 iterations after a checkpoint (the expected loss). The job dies; every
                   stage restarts (forked, like moetion's replacement), loads the checkpoint and
                   re-executes up to f.
  moetion          sparse snapshots (W pinned, ``--window``) and upstream logging; the supervisor
                   replaces the killed stage, survivors pause in place, the replacement replays.

Per approach: wall time from the kill until training is back at iteration f; stage-iterations
re-executed; and lost stage-seconds counted two ways:
  work lost      compute thrown away and redone: every stage's in-flight iteration, plus
                 re-executed iterations (rollback: all stages x (f - checkpoint); moetion: the
                 replacement's replay);
  occupancy lost stage-seconds from the kill until each stage makes new progress again, pauses
                 included (stages x wall time, give or take each stage's own resume).
The >= 10x target of the issue is about work lost; occupancy is printed beside it.

Prints a table and writes experiments/results/bench_recovery.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import moetion
from moetion.data import ByteCorpus, stdlib_corpus
from moetion.demo import SHM_ROOT, DemoSettings, demo_engine_config, demo_model_config, rank_main
from moetion.errors import LaunchError
from moetion.faults import ENV as KILL_ENV
from moetion.faults import FAULT_LOG_ENV
from moetion.recovery.records import Role
from moetion.harness.timeline import timeline
from moetion.launcher import supervise_workers
from moetion.models import build_gpt_moe_layers, gpt_moe_loss

RESULTS = Path(__file__).parent / "results"
STAGES = 4


def rollback_rank(settings: DemoSettings, ckpt_dir: str, interval: int, resume: bool, back_at: int) -> dict:
    """One stage of the global-rollback job: plain training plus a dense checkpoint every ``interval``."""
    model = demo_model_config()
    module = moetion.PipelineModule(build_gpt_moe_layers(model), STAGES, loss_fn=gpt_moe_loss, seed=settings.seed)
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
        if resume and engine.iteration == back_at and back_time is None:
            back_time = time.time()
    engine.close()
    return {"started": started, "loaded": loaded, "back_at": back_time, "saves": saves,
            "iteration_s": sorted(seconds)[len(seconds) // 2]}


def measure_rollback(settings: DemoSettings, interval: int, kill_iteration: int, stage: int, scratch: Path) -> dict:
    ckpt_dir = scratch / "dense"
    ckpt_dir.mkdir()
    fault_log = scratch / "rollback-kills.jsonl"
    env = {KILL_ENV: f"stage={stage},iter={kill_iteration},phase=backward", FAULT_LOG_ENV: str(fault_log)}
    try:
        supervise_workers(rollback_rank, nproc=STAGES, args=(settings, str(ckpt_dir), interval, False, -1),
                          env=env, grace_s=5.0, timeout_s=600)
        raise RuntimeError("the rollback run was supposed to die")
    except LaunchError:
        pass
    killed_at = json.loads(fault_log.read_text().splitlines()[0])["time"]
    checkpoint = torch.load(ckpt_dir / "stage-0.pt", weights_only=True)["iteration"]
    results = supervise_workers(rollback_rank, nproc=STAGES, args=(settings, str(ckpt_dir), interval, True, kill_iteration),
                                timeout_s=600).results
    back = max(r["back_at"] for r in results)
    iteration_s = sorted(r["iteration_s"] for r in results)[STAGES // 2]
    redone = kill_iteration - checkpoint
    return {"approach": "global-rollback", "checkpoint_iteration": checkpoint, "wall_s": back - killed_at,
            "reexecuted_stage_iterations": STAGES * redone,
            # Each stage redoes f - checkpoint iterations and loses its in-flight one (about half an iteration).
            "work_lost_stage_s": STAGES * (redone + 0.5) * iteration_s,
            "occupancy_lost_stage_s": STAGES * (back - killed_at)}


def measure_moetion(settings: DemoSettings, kill_iteration: int, stage: int, scratch: Path) -> dict:
    run_id = f"bench-recovery-{os.getpid()}"
    env = {KILL_ENV: f"stage={stage},iter={kill_iteration},phase=backward",
           FAULT_LOG_ENV: str(scratch / "moetion-kills.jsonl"), "MOETION_RUN_ID": run_id}
    try:
        report = supervise_workers(rank_main, nproc=STAGES, args=(settings, run_id), recover=True, env=env, timeout_s=600)
    finally:
        shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
    (recovery,) = report.recoveries
    line = timeline(recovery)
    events = recovery.rank_events
    inflight = sum(e.inflight_s for e in events.values() if e.role is Role.SURVIVOR)
    replacement = next(e for e in events.values() if e.role is Role.REPLACEMENT)
    resumed = {r: e.resumed_at - recovery.killed_at for r, e in events.items()}
    return {"approach": "moetion", "wall_s": line.total_s, "reexecuted_stage_iterations": line.replayed_stage_iterations,
            "work_lost_stage_s": inflight + replacement.replay_s, "occupancy_lost_stage_s": sum(resumed.values()),
            "timeline": line.to_dict(), "source": replacement.source.value}


def checkpoint_cost(settings: DemoSettings, scratch: Path) -> tuple[float, float]:
    """(seconds per dense checkpoint, seconds per iteration), measured on a short run."""
    probe = scratch / "probe"
    probe.mkdir()
    results = supervise_workers(rollback_rank, nproc=STAGES,
                                args=(DemoSettings(**{**vars(settings), "iterations": 12}), str(probe), 2, False, -1),
                                timeout_s=600).results
    saves = sorted(s for r in results for s in r["saves"])
    return saves[len(saves) // 2], sorted(r["iteration_s"] for r in results)[STAGES // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtbf", type=float, default=1800.0, help="job MTBF in seconds for the Young/Daly interval")
    parser.add_argument("--window", type=int, default=8, help="moetion's pinned snapshot window W")
    parser.add_argument("--stage", type=int, default=2, help="the stage to kill")
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "ERROR")
    scratch = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    try:
        base = DemoSettings(window=args.window, progress=False)
        cost, iteration_s = checkpoint_cost(base, scratch)
        interval = max(2, round(math.sqrt(2 * cost * args.mtbf) / iteration_s))
        checkpoint = 2 * interval
        kill = checkpoint + interval // 2
        settings = DemoSettings(**{**vars(base), "iterations": kill + 5})
        print(f"dense checkpoint C = {cost * 1000:.1f} ms/stage, iteration {iteration_s * 1000:.0f} ms, MTBF {args.mtbf:g} s "
              f"-> Young/Daly interval I = {interval} iterations; kill stage {args.stage} in iteration {kill} "
              f"({interval // 2} after the checkpoint at {checkpoint})", flush=True)
        rollback = measure_rollback(settings, interval, kill, args.stage, scratch)
        moe = measure_moetion(settings, kill, args.stage, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = [rollback, moe]
    print(f"\n{'approach':<16} {'kill->back (s)':>14} {'re-executed':>12} {'work lost (stage-s)':>20} "
          f"{'occupancy lost (stage-s)':>25}")
    for row in rows:
        print(f"{row['approach']:<16} {row['wall_s']:>14.2f} {row['reexecuted_stage_iterations']:>12d} "
              f"{row['work_lost_stage_s']:>20.2f} {row['occupancy_lost_stage_s']:>25.2f}")
    ratios = {key: rollback[key] / moe[key] for key in ("wall_s", "work_lost_stage_s", "occupancy_lost_stage_s")}
    print(f"\nrollback / moetion: wall {ratios['wall_s']:.1f}x, work lost {ratios['work_lost_stage_s']:.1f}x "
          f"(target >= 10x), occupancy lost {ratios['occupancy_lost_stage_s']:.1f}x")
    print("moetion timeline:\n  " + "\n  ".join(timeline_lines(moe)))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_recovery.json"
    out.write_text(json.dumps({"checkpoint_s": cost, "iteration_s": iteration_s, "mtbf_s": args.mtbf,
                               "interval": interval, "kill_iteration": kill, "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


def timeline_lines(row: dict) -> list[str]:
    t = row["timeline"]
    names = [("detect_s", "detected"), ("respawn_s", "respawned"), ("rejoin_s", "rejoined the group"),
             ("script_s", "script reached train_batch"), ("load_s", f"window loaded ({row['source']})"),
             ("logs_s", "logs received"), ("replay_s", "replayed"), ("total_s", "kill -> all resumed")]
    return [f"{label:<28} {t[key] * 1000:7.0f} ms" for key, label in names if t.get(key) is not None]


if __name__ == "__main__":
    main()
