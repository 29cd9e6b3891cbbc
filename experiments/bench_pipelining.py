"""The same torch.distributed.pipelining model with and without moetion attached, side by side in one run.

The model is experiments/examples/pipelining_moe.py's MoE transformer (stacked experts; no router
noise, which draws from moetion.random), one stage per process, Schedule1F1B. Rows, interleaved per round so machine noise hits them alike:

  plain          the user's script: schedule.step, then optimizer.step (the baseline; "plain (A/A)"
                 runs it again for the noise band)
  attached       moetion attached, no snapshots and no logs: its commit alone (global grad norm in
                 stage order, clip, LR, step) and the units of work
  recoverable    moetion attached with sparse snapshots (W pinned) and upstream logging (lz4): what
                 makes a stage recoverable

Per row: median iteration time and its ratio to plain, training-thread time blocked in moetion
(log puts, capture), background CPU, and bytes logged / copied into snapshots per iteration
(experiments/measure.py). Writes experiments/results/bench_pipelining.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

import moetion
from moetion import pipelining
from moetion.launcher import run_workers

from measure import StageProbe, interleave, print_rows, summarize, with_aa, write_results

sys.path.insert(0, str(Path(__file__).parent / "examples"))
import pipelining_moe as model  # noqa: E402

ROWS = {"plain": ("plain",), "attached": ("attached",), "recoverable": ("recoverable",)}


def rank(mode: str, iterations: int, warmup: int, window: int, scratch: str) -> dict:
    """One stage process of a row; its probe's figures over the timed iterations."""
    config = {"seed": 1, "micro_batches": model.MICRO_BATCHES, "grad_clip": 1.0, "threads": 1}
    if mode == "recoverable":
        config |= {"snapshot": {"enabled": True, "window": window, "shm_dir": scratch, "run_id": "bench-pp"},
                   "upstream_log": {"enabled": True}}
    if mode == "plain":
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        stage_id, num_stages, device = dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    else:
        job = pipelining.join(config)
        stage_id, num_stages, device = job.stage, job.num_stages, job.device
    torch.manual_seed(100 + stage_id)
    module = model.Stage(stage_id, num_stages, router_noise=0.0)  # the plain script has no moetion.random
    stage_type = PipelineStage if mode == "plain" else pipelining.LoggedStage
    stage = stage_type(module, stage_id, num_stages, device, input_args=model.example(stage_id, num_stages, output=False),
                       output_args=model.example(stage_id, num_stages, output=True))
    schedule = Schedule1F1B(stage, n_microbatches=model.MICRO_BATCHES, loss_fn=model.loss_fn)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    data = moetion.ByteCorpus(moetion.data.stdlib_corpus(max_bytes=1 << 16), seq_len=model.SEQ,
                              micro_batch_size=model.MICRO_BATCH)
    engine = None if mode == "plain" else pipelining.attach(job, stage, schedule, optimizer=optimizer,
                                                            loss_fn=model.loss_fn)
    probe, seconds = StageProbe(), []
    for t in range(warmup + iterations):
        if t == warmup:
            probe.restart()
        start = time.perf_counter()
        if engine is not None:
            engine.train_batch(data)
        else:
            _plain_step(stage, schedule, optimizer, data, t)
        if t >= warmup:
            seconds.append(time.perf_counter() - start)
    result = {"stage": stage_id, **probe.stop(seconds)}
    if engine is not None:
        engine.close()
    else:
        dist.destroy_process_group()
    return result


def _plain_step(stage: PipelineStage, schedule: Schedule1F1B, optimizer: torch.optim.Optimizer,
                data: moetion.ByteCorpus, t: int) -> None:
    batches = [data.micro_batch(t, m) for m in range(model.MICRO_BATCHES)]
    args = (torch.cat([x for x, _ in batches]),) if stage.is_first else ()
    target = torch.cat([y for _, y in batches]) if stage.is_last else None
    optimizer.zero_grad(set_to_none=True)
    schedule.step(*args, target=target, losses=[] if stage.is_last else None, return_outputs=False)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=3)
    args = parser.parse_args()

    def run(mode: str) -> list[dict]:
        scratch = tempfile.mkdtemp(prefix="moetion-bench-pp-", dir="/dev/shm")
        try:
            return run_workers(rank, nproc=args.stages, args=(mode, args.iterations, args.warmup, args.window, scratch),
                               timeout_s=600)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    per_row = interleave(with_aa(ROWS, "plain"), run, rounds=args.rounds)
    rows = summarize(per_row, baseline="plain")
    print_rows(rows, title=f"torch.distributed.pipelining, {args.stages} stages, Schedule1F1B, "
                           f"{model.MICRO_BATCHES} micro-batches: with and without moetion",
               byte_keys=("logged", "copied", "stored"))
    write_results("bench_pipelining", {"args": vars(args), "rows": [r.to_dict() for r in rows]})


if __name__ == "__main__":
    main()
