"""Blocking time of moetion's generator handling per micro-batch, against an A/A noise band.

Per micro-batch a stage enters two units of work (forward, backward), each saving, seeding and
restoring torch's default generators, and each layer of the forward seeds them again and restores
them. This measures that handling in two ways, on one stage of the demo GPT-MoE model in this
process with one intra-op thread (as a rank runs), timing with the calling thread's CPU clock
(``time.thread_time_ns``) so that other processes on a shared machine do not inflate the figures:

1. isolated: the handling of one micro-batch alone (the two units and every layer entered with
   empty bodies), median over many repetitions;
2. in place: a micro-batch's forward and backward under units with the handling on ("on") and
   off (``determinism.torch_generators = false``: the same step contexts, generators untouched),
   in rounds that interleave three arms, off-A, off-B and on, so that drift hits all alike. Each
   round's figure per arm is the median over its micro-batches; "on - off-A" is the cost, and
   "off-B - off-A" (two identical arms) is the A/A band the cost is judged against.

Prints a table and writes experiments/results/bench_rng.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import moetion
from moetion.demo import demo_model_config
from moetion.determinism import Pass, unit_of_work
from moetion.models import build_gpt_moe_layers, gpt_moe_loss
from moetion.random import step_context

RESULTS = Path(__file__).parent / "results"
ARMS = ("off-A", "off-B", "on")


def build_stage(stages: int, stage_id: int) -> moetion.PipelineModule:
    return moetion.PipelineModule(build_gpt_moe_layers(demo_model_config()), stages, loss_fn=gpt_moe_loss,
                                  stage_id=stage_id, seed=1)


def config(handling: bool) -> moetion.Config:
    return moetion.Config.from_dict({"seed": 3, "micro_batches": 4, "determinism": {"torch_generators": handling}})


def isolated_handling_us(stage: moetion.PipelineModule, repetitions: int) -> float:
    """Thread CPU time of one micro-batch's generator handling alone (empty units and layers)."""
    cfg, layers = config(True), stage.stage_layers(stage.stage_id)
    times = []
    for r in range(repetitions):
        start = time.thread_time_ns()
        for pass_ in (Pass.FORWARD, Pass.BACKWARD):
            with unit_of_work(cfg, stage=stage.stage_id, iteration=r, micro_batch=0, pass_=pass_) as context:
                if pass_ is Pass.FORWARD:
                    for index in layers:
                        with step_context(context.for_layer(index)):
                            pass
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1e3


def micro_batch_ns(stage: moetion.PipelineModule, cfg: moetion.Config, x: torch.Tensor, grad: torch.Tensor,
                   iteration: int, m: int) -> int:
    """Thread CPU time of one micro-batch's forward and backward on the stage, under units."""
    unit = dict(stage=stage.stage_id, iteration=iteration, micro_batch=m)
    start = time.thread_time_ns()
    with unit_of_work(cfg, pass_=Pass.FORWARD, **unit):
        out = stage(x)
    with unit_of_work(cfg, pass_=Pass.BACKWARD, **unit):
        torch.autograd.backward(out, grad_tensors=grad)
    elapsed = time.thread_time_ns() - start
    stage.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--micro-batches", type=int, default=8, help="per arm and round")
    parser.add_argument("--repetitions", type=int, default=2000, help="of the isolated handling")
    parser.add_argument("--out", default=str(RESULTS / "bench_rng.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo_model_config()
    stage = build_stage(stages=4, stage_id=1)  # a middle stage: transformer blocks with MoE layers
    stage.train()
    x = torch.randn(8, model.seq_len, model.d_model, requires_grad=True)
    grad = torch.randn(8, model.seq_len, model.d_model)
    configs = {"off-A": config(False), "off-B": config(False), "on": config(True)}

    handling_us = isolated_handling_us(stage, args.repetitions)
    for arm in ARMS:  # warm-up
        micro_batch_ns(stage, configs[arm], x, grad, 0, 0)
    per_round: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        order = ARMS[r % 3:] + ARMS[:r % 3]  # rotate which arm goes first
        for arm in order:
            times = [micro_batch_ns(stage, configs[arm], x, grad, r, m) for m in range(args.micro_batches)]
            per_round[arm].append(statistics.median(times) / 1e3)
    cost = [on - a for on, a in zip(per_round["on"], per_round["off-A"])]
    aa = [b - a for b, a in zip(per_round["off-B"], per_round["off-A"])]
    band = (min(aa), max(aa))
    median_cost = statistics.median(cost)
    inside = band[0] <= median_cost <= band[1]
    layers = len(stage.stage_layers(stage.stage_id))

    print(f"stage 1 of 4 of the demo GPT-MoE ({layers} layers), 1 intra-op thread, thread CPU time")
    print(f"{'row':<42}{'median us':>12}{'min us':>12}{'max us':>12}")
    print(f"{'handling alone, per micro-batch':<42}{handling_us:>12.1f}")
    for arm in ARMS:
        values = per_round[arm]
        print(f"{'micro-batch fwd+bwd, ' + arm:<42}{statistics.median(values):>12.1f}{min(values):>12.1f}{max(values):>12.1f}")
    print(f"{'cost: on - off-A':<42}{median_cost:>12.1f}{min(cost):>12.1f}{max(cost):>12.1f}")
    print(f"{'A/A band: off-B - off-A':<42}{statistics.median(aa):>12.1f}{band[0]:>12.1f}{band[1]:>12.1f}")
    share = handling_us / statistics.median(per_round["off-A"])
    print(f"handling alone is {100 * share:.3f}% of a micro-batch; the in-place cost is "
          f"{'inside' if inside else 'OUTSIDE'} the A/A band [{band[0]:.1f}, {band[1]:.1f}] us")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "demo GPT-MoE, stage 1 of 4", "layers": layers, "threads": 1, "clock": "thread_time_ns",
        "rounds": args.rounds, "micro_batches_per_round": args.micro_batches,
        "handling_alone_us": handling_us, "per_round_us": per_round, "cost_us": cost, "aa_us": aa,
        "median_cost_us": median_cost, "aa_band_us": list(band), "cost_inside_aa_band": inside,
        "handling_share_of_micro_batch": share,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
