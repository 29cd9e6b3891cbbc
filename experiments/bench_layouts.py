"""Sparse snapshot bytes per iteration for the user layouts of tests/moetion/layout_models.py vs the
built-in MoELayer of the same sizes, and the dense price moetion would pay for an unmapped layer;
plus the per-iteration cost of cloning a stage's buffers at the commit point (model_state).

Bytes are counted from the real window layout (moetion.snapshot.layout.plan_layout) of one layer
after an AdamW step, W = experts/2: the average bytes copied per iteration over a window, and the
same with the layer snapshotted densely (every window a full snapshot of all of it). Bytes are
exact, so their A/A band is 0; the clone timing prints its A/A band (two identical series).

    PYTHONPATH=. python experiments/bench_layouts.py [--experts 8 --d-model 256 --hidden 1024]
Writes experiments/results/bench_layouts.json. The machine may be shared: timings are noisy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "moetion"))
import layout_models as models  # noqa: E402  (the test layouts, not a library)

from moetion.model_state import CommittedState  # noqa: E402
from moetion.moe import MoELayer  # noqa: E402
from moetion.operators import Operator, discover_operators  # noqa: E402
from moetion.snapshot.layout import plan_layout  # noqa: E402
from moetion.window import snapshot_order, split_into_slots  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_layouts.json"


def window_bytes(layer: nn.Module, window: int, *, dense: bool) -> float:
    """Average bytes captured per iteration over one window of ``layer`` (in a Sequential)."""
    model = nn.Sequential(layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    operators = discover_operators(model)
    if dense:
        names = tuple(n for op in operators for n in dict.fromkeys(op.param_names))
        operators = [Operator("0", "dense", tuple(dict.fromkeys(names)), 0, 0)]
        window = 1
    plan = split_into_slots(snapshot_order(operators, {}), window)
    layout = plan_layout(plan=plan, operators={op.name: op for op in operators}, master=model, compute=model,
                         optimizer=optimizer, state={})
    return sum(e.nbytes for capture in layout.entries for e in capture) / window


def clone_seconds(d: int, repeats: int = 200) -> list[float]:
    block = nn.Sequential(*(models.BufferedBlock(d) for _ in range(4)))
    state = CommittedState(block)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state.commit()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    e, d, h, window = args.experts, args.d_model, args.hidden, max(1, args.experts // 2)
    torch.manual_seed(0)
    builtin = MoELayer(d, h, e)
    layers = {"built-in MoELayer": builtin, "ModuleList of user experts": models.ListMoE(d, e, h),
              "stacked, detected": models.GroupedMoE(d, e, h), "stacked, declared": models.DeclaredMoE(d, e, h)}
    base = window_bytes(builtin, window, dense=False)
    rows = []
    print(f"E={e} d_model={d} hidden={h} W={window}: snapshot bytes per iteration (A/A band 0: bytes are exact)")
    print(f"{'layout':30s} {'params':>10s} {'sparse B/it':>12s} {'vs built-in':>12s} {'dense B/it':>12s}")
    for name, layer in layers.items():
        sparse = window_bytes(layer, window, dense=False)
        dense = window_bytes(layer, window, dense=True)
        params = sum(p.numel() for p in layer.parameters())
        rows.append({"layout": name, "params": params, "sparse_bytes_per_iteration": sparse,
                     "ratio_to_builtin": sparse / base, "dense_bytes_per_iteration": dense})
        print(f"{name:30s} {params:10d} {sparse:12.0f} {sparse / base:12.3f} {dense:12.0f}")
    a, b = clone_seconds(d), clone_seconds(d)
    med_a, med_b = statistics.median(a), statistics.median(b)
    print(f"commit clone of 4 BufferedBlocks' state (d={d}): median {med_a * 1e6:.1f} us, "
          f"A/A {med_b * 1e6:.1f} us (band {abs(med_a - med_b) / med_a:.1%})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"experts": e, "d_model": d, "hidden": h, "window": window, "rows": rows,
                                   "commit_clone_us": [med_a * 1e6, med_b * 1e6]}, indent=2))


if __name__ == "__main__":
    main()
