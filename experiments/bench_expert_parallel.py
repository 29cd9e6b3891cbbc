"""Expert parallelism: EP 1 vs EP 2 on the same model and ranks, side by side in one run.

2 stages x 2 data-parallel replicas (4 processes), the demo's GPT-MoE shape with 8 experts per
layer, sparse snapshots every iteration (W pinned) and upstream logging on, as in production. The
rows alternate round by round so machine noise hits both alike; per row: the median iteration time
(stage 0, over rounds), the parameters one rank holds, and the snapshot bytes per iteration one rank
captures (its last complete window's blob / W), each per stage.

    PYTHONPATH=. python experiments/bench_expert_parallel.py [--rounds 3] [--iterations 12]

Writes experiments/results/bench_expert_parallel.json.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

import moetion
from measure import interleave, write_results
from moetion.data import stdlib_corpus
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss

MODEL = GPTMoEConfig(seq_len=64, d_model=64, n_heads=4, n_layers=4, d_hidden=128, num_experts=8, top_k=2)
STAGES, REPLICAS, WINDOW = 2, 2, 4


def rank(ep_size: int, iterations: int, root: str) -> dict:
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), STAGES, loss_fn=gpt_moe_loss, seed=0, ep_size=ep_size)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3), config={
        "seed": 0, "micro_batches": 4, "threads": 1,
        "snapshot": {"enabled": True, "window": WINDOW, "shm_dir": f"{root}/shm", "run_id": f"ep{ep_size}"},
        "upstream_log": {"enabled": True}})
    data = moetion.ByteCorpus(stdlib_corpus(max_bytes=1 << 18), seq_len=MODEL.seq_len, micro_batch_size=4)
    seconds = []
    while engine.iteration < iterations:
        engine.train_batch(data)
        seconds.append(engine.last_stats.seconds)
    engine.checkpointer.drain(timeout_s=60)
    window = engine.checkpointer.last_complete
    engine.close()
    return {"stage": engine.stage, "replica": engine.dist.replica, "seconds": seconds[2:],
            "params": sum(p.numel() for p in module.parameters()),
            "snapshot_bytes_per_iteration": window.blob_bytes / window.window}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def run(ep_size: int) -> list[dict]:
        with tempfile.TemporaryDirectory() as root:
            ranks = run_workers(rank, nproc=STAGES * REPLICAS, args=(ep_size, args.iterations, root), timeout_s=600)
        return sorted(ranks, key=lambda r: (r["stage"], r["replica"]))

    per_row = interleave({"EP 1": (1,), "EP 2": (2,)}, run, rounds=args.rounds)
    report = {}
    print(f"\n{'row':6} {'median ms':>10} {'params/rank (stage 0, 1)':>26} {'snapshot B/iter/rank (stage 0, 1)':>36}")
    for label, rounds in per_row.items():
        last = rounds[-1]
        stage0 = [s for r in rounds for s in r[0]["seconds"]]
        by_stage = [next(r for r in last if r["stage"] == s) for s in range(STAGES)]
        row = {"median_ms": statistics.median(stage0) * 1000,
               "params_per_rank": [r["params"] for r in by_stage],
               "snapshot_bytes_per_iteration_per_rank": [r["snapshot_bytes_per_iteration"] for r in by_stage]}
        report[label] = row
        print(f"{label:6} {row['median_ms']:10.1f} {str(row['params_per_rank']):>26} "
              f"{str([round(b) for b in row['snapshot_bytes_per_iteration_per_rank']]):>36}")
    write_results("bench_expert_parallel", report)


if __name__ == "__main__":
    main()
