"""Iteration-time overhead of checkpointing every iteration, side by side in one run.

Rows (same model, same 4 stage processes, interleaved rounds so machine noise hits all alike):
  none        no checkpointing (the baseline every ratio is against)
  sparse-auto moetion sparse snapshots, W chosen by Algorithm 1 from measured time and bandwidth
  sparse-W    moetion sparse snapshots with W pinned (one row per --windows value)
  dense       a full snapshot of every operator every iteration to host memory (Gemini-style;
              the same capture machinery with W=1)
  dcp-async   torch.distributed.checkpoint.async_save of model + optimizer every iteration
Snapshot rows keep windows in /dev/shm and replicate each to a peer stage, as in production.

Prints a table and writes experiments/results/bench_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import moetion
from moetion.data import stdlib_corpus
from moetion.demo import demo_model_config
from moetion.launcher import run_workers
from moetion.models import build_gpt_moe_layers, gpt_moe_loss

RESULTS = Path(__file__).parent / "results"


def run_mode(mode: str, window: int | None, args: argparse.Namespace, scratch: str) -> dict:
    model = demo_model_config()
    module = moetion.PipelineModule(build_gpt_moe_layers(model), args.stages, loss_fn=gpt_moe_loss)
    snapshot = {"enabled": mode in ("sparse", "dense"), "window": window, "shm_dir": f"{scratch}/shm",
                "run_id": f"bench-{mode}-{window}"}
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3), config={
        "micro_batches": args.micro_batches, "precision": args.precision, "snapshot": snapshot})
    data = moetion.ByteCorpus(stdlib_corpus(), seq_len=model.seq_len, micro_batch_size=8)
    own_group = None
    for rank in range(dist.get_world_size()):  # DCP coordinates within a group: one per stage
        group = dist.new_group([rank], backend="gloo")
        own_group = group if rank == dist.get_rank() else own_group
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    pending, seconds = None, []
    for t in range(args.warmup + args.iterations):
        engine.train_batch(data)
        if mode == "dcp-async":
            if pending is not None:
                pending.result()
            state = {"model": module.state_dict(), "optim": engine.optimizer.state_dict()}
            pending = dcp.async_save(state, checkpoint_id=f"{scratch}/dcp-{engine.dist.rank}/iter-{t % 2}",
                                     process_group=own_group)
        if t >= args.warmup:
            seconds.append(engine.last_stats.seconds)
    if pending is not None:
        pending.result()
    engine.close()
    ckpt = engine.checkpointer
    result = {"seconds": seconds, "bytes_per_iteration": 0.0, "host_bytes": 0, "window": None, "fence_ms": 0.0}
    if ckpt is not None and ckpt.last_complete is not None:
        manifest = ckpt.last_complete
        result.update(bytes_per_iteration=manifest.blob_bytes / manifest.window, window=manifest.window,
                      host_bytes=sum(ckpt.tier_bytes().values()),
                      fence_ms=ckpt.worker.seconds_fenced * 1000 / (args.warmup + args.iterations))
    if mode == "dcp-async":
        files = [p for p in Path(f"{scratch}/dcp-{engine.dist.rank}").rglob("*") if p.is_file()]
        result["bytes_per_iteration"] = sum(p.stat().st_size for p in files) / 2
        result["host_bytes"] = sum(p.stat().st_size for p in files)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--quick", action="store_true", help="few iterations, one round")
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "WARNING")
    if args.quick:
        args.iterations, args.warmup, args.rounds = 8, 2, 1
    rows = [("none", None), ("sparse", None), *[("sparse", w) for w in args.windows], ("dense", 1), ("dcp-async", None)]
    per_row: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for mode, window in rows:
            label = {"none": "none", "dense": "dense", "dcp-async": "dcp-async"}.get(mode) or (
                "sparse-auto" if window is None else f"sparse-W{window}")
            scratch = tempfile.mkdtemp(prefix="moetion-bench-", dir="/dev/shm")
            try:
                ranks = run_workers(run_mode, nproc=args.stages, args=(mode, window, args, scratch), timeout_s=600)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            per_row.setdefault(label, []).append(ranks[0])
            print(f"round {round_index + 1}/{args.rounds}: {label:12s} median "
                  f"{statistics.median(ranks[0]['seconds']) * 1000:.1f} ms", flush=True)
    base = statistics.median(s for r in per_row["none"] for s in r["seconds"])
    dense_bytes = per_row["dense"][0]["bytes_per_iteration"]
    table = []
    for label, results in per_row.items():
        median = statistics.median(s for r in results for s in r["seconds"])
        last = results[-1]
        table.append({"mode": label, "median_ms": median * 1000, "ratio_vs_none": median / base,
                      "window": last["window"], "bytes_per_iteration": last["bytes_per_iteration"],
                      "bytes_vs_dense": last["bytes_per_iteration"] / dense_bytes if dense_bytes else None,
                      "host_bytes": last["host_bytes"], "fence_ms": last["fence_ms"]})
    print(f"\n{'mode':12s} {'ms/iter':>8s} {'x none':>7s} {'W':>3s} {'KiB/iter':>9s} {'x dense':>8s} {'held KiB':>9s} {'fence ms':>8s}")
    for row in table:
        print(f"{row['mode']:12s} {row['median_ms']:8.1f} {row['ratio_vs_none']:7.3f} {row['window'] or '-':>3} "
              f"{row['bytes_per_iteration'] / 1024:9.1f} "
              f"{row['bytes_vs_dense'] if row['bytes_vs_dense'] is not None else float('nan'):8.3f} "
              f"{row['host_bytes'] / 1024:9.1f} {row['fence_ms']:8.2f}")
    print("(stage 0's figures; KiB/iter and held KiB are per stage replica; held = shared memory + peer replica,"
          " or disk for DCP)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_overhead.json"
    out.write_text(json.dumps({"settings": vars(args), "rows": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
