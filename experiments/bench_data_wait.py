"""Training-thread time blocked on data, per iteration, with and without prefetching.

A map-style dataset whose items cost 5 ms each (``--item-ms``) feeds a 2-stage GPT-MoE pipeline
(both stages read: the first its inputs, the last its labels). Rows alternate in blocks of
``--block`` iterations inside one run, so machine noise hits every row alike:

  direct      DatasetSource read on the training thread
  direct-A/A  the same again: the spread between the two direct rows is the A/A noise band
  prefetch    PrefetchingSource(depth=--depth, workers=--workers) over the same DatasetSource

A row's figure is the median over its blocks of the first stage's blocked seconds per iteration;
each block's first iteration (the prefetcher cannot foresee a switch of source) is left out.
Prints the table and writes experiments/results/bench_data_wait.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import moetion
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.prefetch import PrefetchingSource

MODEL = GPTMoEConfig(seq_len=32, d_model=64, n_heads=4, n_layers=4, d_hidden=128, num_experts=4)
ROWS = ("direct", "prefetch", "direct-A/A")


class SlowItems(Dataset):
    def __init__(self, n: int, item_s: float) -> None:
        self.n, self.item_s = n, item_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(self.item_s)  # a decode or a read from slow storage
        tokens = torch.randint(0, 256, (MODEL.seq_len + 1,), generator=torch.Generator().manual_seed(i))
        return tokens[:-1], tokens[1:]


class Timed:
    """The training thread's blocked time on a source read directly."""

    def __init__(self, source) -> None:
        self.source, self.seconds_waited = source, 0.0

    def micro_batch(self, iteration: int, index: int):
        start = time.perf_counter()
        batch = self.source.micro_batch(iteration, index)
        self.seconds_waited += time.perf_counter() - start
        return batch


def rank(args: argparse.Namespace) -> dict:
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                                config={"micro_batches": args.micro_batches, "threads": 1})
    base = moetion.DatasetSource(SlowItems(100_000, args.item_ms / 1000), micro_batch_size=args.micro_batch_size,
                                 micro_batches_per_iteration=args.micro_batches, shuffle=True, seed=1)
    sources = {"direct": Timed(base), "direct-A/A": Timed(base),
               "prefetch": PrefetchingSource(base, micro_batches=args.micro_batches, depth=args.depth, workers=args.workers)}
    blocked: dict[str, list[float]] = {row: [] for row in ROWS}
    for block in range(args.rounds * len(ROWS)):
        row = ROWS[block % len(ROWS)]
        source = sources[row]
        per_iteration = []
        for _ in range(args.block):
            before = source.seconds_waited
            engine.train_batch(source)
            per_iteration.append(source.seconds_waited - before)
        blocked[row].append(statistics.mean(per_iteration[1:]))
    sources["prefetch"].close()
    engine.close()
    return {"stage": engine.stage, "blocked": blocked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--item-ms", type=float, default=5.0)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ranks = run_workers(rank, nproc=2, args=(args,), timeout_s=900)
    first = next(r for r in ranks if r["stage"] == 0)
    medians = {row: statistics.median(v) for row, v in first["blocked"].items()}
    band = abs(medians["direct"] - medians["direct-A/A"])
    print(f"items cost {args.item_ms:g} ms; {args.micro_batches} micro-batches x {args.micro_batch_size} items "
          f"per iteration; median over {args.rounds} blocks of {args.block} iterations (first of each left out)")
    print(f"{'row':12} {'blocked ms/iteration (stage 0)':>32}")
    for row in ROWS:
        print(f"{row:12} {medians[row] * 1e3:32.1f}")
    print(f"A/A noise band: +-{band * 1e3:.1f} ms/iteration")
    out = Path(__file__).parent / "results" / "bench_data_wait.json"
    out.write_text(json.dumps({"args": vars(args), "ms_per_iteration": {r: m * 1e3 for r, m in medians.items()},
                               "aa_band_ms": band * 1e3, "per_block_s": first["blocked"]}, indent=2))


if __name__ == "__main__":
    main()
