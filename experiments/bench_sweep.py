"""How moetion's cost grows with the model: expert width, experts per layer, micro-batches.

One axis at a time around the demo model (the other two at their defaults): for each point, the
stages train with no checkpointing ("none"), again ("none (A/A)", the noise band) and with sparse
snapshots at W pinned to --window ("sparse"), interleaved. Per point it prints the measures of
experiments/measure.py for the sparse row: training-thread time blocked (wall and CPU), moetion's
background CPU as a share of training CPU, bytes copied per iteration, the wall ratio against
"none" with the point's A/A band, and the snapshot slice (the bytes a capture is expected to copy
per iteration: the largest slot's full snapshot plus later slots' compute copies, from the window
scheduler). Expected: bytes and background CPU grow linearly in the slice; blocking stays flat.

Prints a table and writes experiments/results/bench_sweep.json (and bench_sweep.png with matplotlib).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile

import torch

import moetion
from moetion.data import stdlib_corpus
from moetion.demo import demo_model_config
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss

from measure import StageProbe, interleave, save_figure, summarize, with_aa, write_results

AXES = {"d_hidden": (128, 256, 512, 1024), "num_experts": (4, 8, 16, 32), "micro_batches": (2, 4, 8)}
QUICK_AXES = {"d_hidden": (128, 512, 1024), "num_experts": (4, 16, 32), "micro_batches": (4, 8)}


def run_point(mode: str, model: GPTMoEConfig, micro_batches: int, args: argparse.Namespace, scratch: str) -> dict:
    """One stage process: ``mode`` none or sparse (W pinned) on ``model``."""
    module = moetion.PipelineModule(build_gpt_moe_layers(model), args.stages, loss_fn=gpt_moe_loss)
    snapshot = {"enabled": mode == "sparse", "window": args.window, "shm_dir": f"{scratch}/shm", "run_id": "sweep"}
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                                config={"micro_batches": micro_batches, "snapshot": snapshot})
    data = moetion.ByteCorpus(stdlib_corpus(), seq_len=model.seq_len, micro_batch_size=8)
    probe, seconds = StageProbe(), []
    for t in range(args.warmup + args.iterations):
        if t == args.warmup:
            probe.restart()
        engine.train_batch(data)
        if t >= args.warmup:
            seconds.append(engine.last_stats.seconds)
    result = probe.stop(seconds)
    result["params"] = sum(p.numel() for p in module.parameters())
    engine.close()
    return result


def run_stages(mode: str, model: GPTMoEConfig, micro_batches: int, args: argparse.Namespace) -> list[dict]:
    scratch = tempfile.mkdtemp(prefix="moetion-sweep-", dir="/dev/shm")
    try:
        return run_workers(run_point, nproc=args.stages, args=(mode, model, micro_batches, args, scratch), timeout_s=600)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def points(axes: dict[str, tuple[int, ...]]) -> list[tuple[str, int, GPTMoEConfig, int]]:
    """(axis, value, model, micro-batches): one axis moved at a time, the defaults point once."""
    base, default_mb = demo_model_config(), 4
    out, seen = [], set()
    for axis, values in axes.items():
        for value in values:
            model = dataclasses.replace(base, **{axis: value}) if axis != "micro_batches" else base
            mb = value if axis == "micro_batches" else default_mb
            key = (model.d_hidden, model.num_experts, mb)
            if key not in seen:
                seen.add(key)
                out.append((axis, value, model, mb))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per point (the A/A band needs >= 2)")
    parser.add_argument("--full", action="store_true", help=f"every value of {AXES} (default: {QUICK_AXES})")
    args = parser.parse_args()
    os.environ.setdefault("MOETION_LOG_LEVEL", "WARNING")
    rows = []
    for axis, value, model, mb in points(AXES if args.full else QUICK_AXES):
        print(f"{axis} = {value}", flush=True)
        per_row = interleave(with_aa({"none": ("none", model, mb, args), "sparse": ("sparse", model, mb, args)}, "none"),
                             run_stages, rounds=args.rounds)
        sparse = next(r for r in summarize(per_row, baseline="none") if r.label == "sparse")
        params = sum(s["params"] for s in per_row["sparse"][0])
        rows.append({"axis": axis, "value": value, "d_hidden": model.d_hidden, "num_experts": model.num_experts,
                     "micro_batches": mb, "params": params, **sparse.to_dict()})
    print(f"\nsparse snapshots W={args.window}, {args.stages} stages, {args.rounds} rounds per point, cost per iteration vs model size "
          "(band: the point's A/A noise band)")
    print(f"{'axis':>13s} {'value':>6s} {'params M':>8s} {'copied KiB':>10s} {'blocked ms':>10s} {'CPU ms':>7s} "
          f"{'bg CPU':>7s} {'x none':>7s} {'band':>6s}  verdict")
    for r in rows:
        print(f"{r['axis']:>13s} {r['value']:>6d} {r['params'] / 1e6:8.2f} {r['bytes_per_iteration'].get('copied', 0) / 1024:10.1f} "
              f"{r['blocked_ms']:10.3f} {r['blocked_cpu_ms']:7.3f} {r['background_cpu_share'] * 100:6.2f}% "
              f"{r['ratio']:7.3f} {r['band'] * 100:5.1f}%  {r['verdict']}")
    write_results("bench_sweep", {"settings": vars(args), "rows": rows})
    plot(rows)


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis in AXES:
        cells = [r for r in rows if r["axis"] == axis]
        if not cells:
            continue
        sizes = [r["bytes_per_iteration"].get("copied", 0) / 2**20 for r in cells]
        left.plot(sizes, [r["background_cpu_share"] * 100 for r in cells], marker="o", label=axis)
        right.plot(sizes, [r["blocked_cpu_ms"] for r in cells], marker="o", label=f"{axis} (CPU)")
        right.plot(sizes, [r["blocked_ms"] for r in cells], marker="x", linestyle="--", label=f"{axis} (wall)")
    left.set_xlabel("MiB copied per iteration")
    left.set_ylabel("background CPU, % of training CPU")
    right.set_xlabel("MiB copied per iteration")
    right.set_ylabel("training thread blocked, ms per iteration")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    save_figure(fig, "bench_sweep")


if __name__ == "__main__":
    main()
