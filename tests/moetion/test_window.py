"""Algorithm 1 (window size), slot splitting, snapshot order and drift, against hand-computed cases."""
import pytest

from moetion import ConfigError
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.module import PipelineModule
from moetion.operators import Operator, discover_operators
from moetion.window import (BackgroundWork, capture_budget_bytes, cpu_seconds_per_captured_byte, find_window_size,
                            popularity_drifted, slot_cost, snapshot_order, split_into_slots)

ORDER = ["a", "b", "c", "d"]
FULL = {n: 10 for n in ORDER}
COMPUTE = {n: 2 for n in ORDER}


def test_slots_are_contiguous_and_balanced():
    assert split_into_slots(ORDER, 3).slots == (("a", "b"), ("c",), ("d",))
    assert split_into_slots(ORDER, 6).slots == (("a",), ("b",), ("c",), ("d",), (), ())
    with pytest.raises(ConfigError):
        split_into_slots(ORDER, 0)


def test_slot_cost_is_full_of_the_slot_plus_compute_of_later_slots():
    plan = split_into_slots(ORDER, 2)  # (a, b) (c, d)
    assert slot_cost(plan, 0, full=FULL, compute=COMPUTE) == 20 + 4
    assert slot_cost(plan, 1, full=FULL, compute=COMPUTE) == 20


@pytest.mark.parametrize("budget, window", [(40, 1), (39, 2), (24, 2), (23, 4), (16, 4)])
def test_smallest_window_that_fits_the_budget(budget, window):
    # W=1: 40. W=2: max(24, 20). W=3: (a,b)(c)(d) -> 20+4=24. W=4: 10+6=16.
    assert find_window_size(ORDER, full=FULL, compute=COMPUTE, budget_bytes=budget) == window


def test_impossible_budget_says_what_is_needed():
    with pytest.raises(ConfigError, match="even one operator per slot needs"):
        find_window_size(ORDER, full=FULL, compute=COMPUTE, budget_bytes=15)


def test_budget_is_a_share_of_the_iteration_cost_spent_at_the_cost_per_byte():
    assert capture_budget_bytes(fraction=0.04, seconds_per_iteration=0.5, seconds_per_byte=1e-8) == pytest.approx(2e6)


def test_each_background_thread_costs_its_cpu_per_byte_it_handled():
    capture = BackgroundWork(cpu_seconds=1.0, nbytes=10**9)  # 1 ns per byte
    send = BackgroundWork(cpu_seconds=1.0, nbytes=5 * 10**8)  # a window behind the capture: 2 ns per byte it sent
    receive = BackgroundWork(cpu_seconds=0.0, nbytes=0)  # nothing arrived yet: counts as the capture, 1 ns
    persist = BackgroundWork(cpu_seconds=4.0, nbytes=10**9, share=0.5)  # every 2nd window: 4 ns x 1/2
    per_byte = cpu_seconds_per_captured_byte([capture, send, receive, persist], first_guess=1.0)
    assert per_byte == pytest.approx((1 + 2 + 1 + 2) * 1e-9)
    # Before any thread handled a byte, each counts as the probe's first guess.
    assert cpu_seconds_per_captured_byte([BackgroundWork(0.3, 0)] * 3, first_guess=5e-9) == pytest.approx(15e-9)


def test_experts_by_ascending_popularity_then_routers_and_dense():
    ops = [Operator("l.e0", "expert", ("x",), 1, 1), Operator("l.router", "router", ("y",), 1, 1),
           Operator("l.e1", "expert", ("z",), 1, 1), Operator("dense", "dense", ("w",), 1, 1),
           Operator("l.e2", "expert", ("v",), 1, 1)]
    assert snapshot_order(ops, {"l.e0": 5, "l.e1": 1, "l.e2": 5}) == ["l.e1", "l.e0", "l.e2", "l.router", "dense"]


def test_popularity_drift_thresholds():
    before = {"a": 100, "b": 100, "c": 100, "d": 100}
    assert not popularity_drifted(before, {"a": 109, "b": 100, "c": 100, "d": 100})
    assert popularity_drifted(before, {"a": 111, "b": 100, "c": 100, "d": 100})  # 1 of 4 = 25%
    assert not popularity_drifted(before, {"a": 111, "b": 100, "c": 100, "d": 100}, fraction=0.5)


def test_every_parameter_belongs_to_exactly_one_operator():
    module = PipelineModule(build_gpt_moe_layers(GPTMoEConfig(n_layers=2, num_experts=3)), 1,
                            loss_fn=gpt_moe_loss, stage_id=0)
    ops = discover_operators(module)
    kinds = [op.kind for op in ops]
    assert kinds.count("expert") == 6 and kinds.count("router") == 2
    owned = sorted(n for op in ops for n in op.param_names)
    assert owned == sorted(n for n, _ in module.named_parameters())
    expert = next(op for op in ops if op.kind == "expert")
    assert expert.full_bytes() == expert.numel * 12 + expert.num_tensors * 4
    assert expert.compute_bytes(precision="bf16") == expert.numel * 2
