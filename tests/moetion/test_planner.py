"""moetion.planner: Young/Daly, W from the runtime scheduler, analytic vs simulated ETTR, errors, CLI."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from moetion.errors import ConfigError
from moetion.operators import Operator
from moetion.planner import (ApproachCost, HardwareSpec, ModelSpec, analytic_ettr, plan_approaches, preset,
                             simulate_ettr, young_daly_interval_s)
from moetion.planner.cost import sparse_window, synthetic_operators, young_daly_interval_iterations
from moetion.planner.spec import load_spec, parse_duration
from moetion.window import find_window_size, snapshot_order


def _small_model(**overrides) -> ModelSpec:
    # 1 MoE layer, 4 experts of 1000 params, dense layer of 1000 params: 5 operators of 12,000 B full / 2,000 B compute
    values = dict(total_params=5000, pipeline_stages=1, experts_per_layer=4, expert_params=1000,
                  moe_layers_per_stage=1, precision="bf16", micro_batches=2, micro_batch_tokens=8, hidden_size=4)
    values.update(overrides)
    return ModelSpec(**values)


def _hardware(*, iteration_s: float = 1.0, d2h_bytes_per_s: float = 1e9) -> HardwareSpec:
    return HardwareSpec(iteration_s=iteration_s, device_to_host_gbps=d2h_bytes_per_s / 1e9, network_gbps=1.0,
                        disk_gbps=1.0, respawn_s=10.0, restart_s=60.0)


def _cost(*, interval: int, stall_s: float, fixed_s: float, base: float = 0.0) -> ApproachCost:
    return ApproachCost(approach="test", interval=interval, interval_kind="I", iteration_s=1.0,
                        checkpoint_stall_s=stall_s, snapshot_bytes_per_iteration=0.0, log_bytes_per_iteration=0.0,
                        host_memory_bytes=0.0, fixed_recovery_s=fixed_s, replay_base_iterations=base)


def test_young_daly_matches_hand_computed_values():
    assert young_daly_interval_s(8.0, 3600.0) == pytest.approx(240.0)  # sqrt(2 * 8 * 3600)
    assert young_daly_interval_s(50.0, 600.0) == pytest.approx(math.sqrt(60000.0))  # 244.95
    assert young_daly_interval_iterations(8.0, 3600.0, 2.0) == 120
    assert young_daly_interval_iterations(1e-6, 600.0, 5.0) == 1  # never below one iteration


def test_hand_computed_small_window():
    # Budget 25,000 B: W=1 needs 60,000; W=2 slots (3 ops, 2 ops): 36,000 + 4,000; W=3 (2,2,1): 24,000 + 6,000 = 30,000;
    # W=4 (2,1,1,1): 24,000 + 3 x 2,000 = 30,000; W=5: 12,000 + 4 x 2,000 = 20,000 -> W = 5.
    plan = sparse_window(_small_model(), _hardware(d2h_bytes_per_s=25_000))
    assert plan.window == 5
    assert plan.max_slot_bytes == 20_000
    # a larger budget: W=2 costs max(36,000 + 4,000, 24,000) = 40,000
    assert sparse_window(_small_model(), _hardware(d2h_bytes_per_s=40_000)).window == 2


@pytest.mark.parametrize("budget", [30e9, 10e9, 5e9])
def test_window_equals_runtime_scheduler(budget):
    model, _ = preset("deepseek-moe-16b")
    hardware = HardwareSpec(iteration_s=1.0, device_to_host_gbps=budget / 1e9, network_gbps=3, disk_gbps=0.5)
    ops = synthetic_operators(model)
    expected = find_window_size(
        snapshot_order(ops, {}), full={op.name: op.numel * 12 for op in ops},
        compute={op.name: op.numel * 2 for op in ops}, budget_bytes=budget,
    )
    assert sparse_window(model, hardware).window == expected
    assert plan_approaches(model, hardware, mtbf_s=600)["moevement"].interval == expected
    assert all(isinstance(op, Operator) for op in ops)
    assert len(ops) == 3 * 64 + 3


@pytest.mark.parametrize("cost", [
    _cost(interval=50, stall_s=2.0, fixed_s=20.0),  # dense-checkpoint-like
    _cost(interval=4, stall_s=0.0, fixed_s=15.0, base=4),  # sparse-window-like (E = 1.5 W)
])
def test_analytic_and_simulated_ettr_agree(cost):
    # E[R]/MTBF ~ 1%: failures during recovery (which only the simulator models) are negligible.
    mtbf_s = 5000.0
    result = simulate_ettr(cost, mtbf_s=mtbf_s, runs=40, horizon_failures=400, seed=1)
    assert result.ci_low - 1e-3 <= analytic_ettr(cost, mtbf_s=mtbf_s) <= result.ci_high + 1e-3
    assert result.half_width < 0.01
    assert result.failures > 40 * 300


def test_simulator_is_seeded_and_sees_failures_during_recovery():
    cost = _cost(interval=10, stall_s=0.0, fixed_s=300.0)
    a = simulate_ettr(cost, mtbf_s=600.0, runs=10, seed=7)
    assert a == simulate_ettr(cost, mtbf_s=600.0, runs=10, seed=7)
    # recovery ~ half an MTBF: restarts during recovery push ETTR well below the first-order formula
    assert a.ci_high < analytic_ettr(cost, mtbf_s=600.0)


def test_expected_recovery_is_one_and_a_half_windows():
    cost = _cost(interval=8, stall_s=0.0, fixed_s=30.0, base=8)
    assert cost.expected_recovery_s == pytest.approx(30 + 12)
    assert cost.worst_recovery_s == pytest.approx(30 + 16)


@pytest.mark.parametrize("overrides, match", [
    (dict(total_params=-1), "total_params must be a positive"),
    (dict(expert_params=0), "expert_params must be a positive"),
    (dict(micro_batches=0), "micro_batches must be a positive integer"),
    (dict(precision="fp16"), "precision"),
    (dict(expert_params=2000), "exceed params_per_stage"),
])
def test_bad_model_descriptions(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _small_model(**overrides)


def test_bad_hardware_and_mtbf():
    with pytest.raises(ConfigError, match="disk_gbps must be a positive"):
        HardwareSpec(iteration_s=1.0, device_to_host_gbps=25, network_gbps=3, disk_gbps=-1)
    with pytest.raises(ConfigError, match="shorter than one iteration"):
        plan_approaches(_small_model(), _hardware(iteration_s=2.0), mtbf_s=1.0)


def test_budget_too_small_even_for_one_operator_per_slot():
    # one operator's full snapshot alone is 12,000 B: a 10,000 B budget cannot hold any slot
    with pytest.raises(ConfigError, match="even one operator per slot"):
        plan_approaches(_small_model(), _hardware(d2h_bytes_per_s=10_000), mtbf_s=600)


def test_durations_and_json_overrides():
    assert parse_duration("10m") == 600 and parse_duration("2h") == 7200 and parse_duration("90s") == 90
    assert parse_duration("45") == 45
    with pytest.raises(ConfigError, match="cannot read duration"):
        parse_duration("ten minutes")
    model, hardware = load_spec('{"hardware": {"iteration_s": 2.0}}', preset_name="gpt-moe")
    assert hardware.iteration_s == 2.0 and model.name == "gpt-moe"
    with pytest.raises(ConfigError, match="unknown ModelSpec field"):
        load_spec('{"model": {"layers": 3}}', preset_name="gpt-moe")


def test_cli_prints_the_table_for_a_preset():
    done = subprocess.run(
        [sys.executable, "-m", "moetion.cli", "plan", "--preset", "deepseek-moe-16b", "--mtbf", "10m", "--runs", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for name in ("MoEvement", "CheckFreq", "Gemini", "MoC", "recommended:"):
        assert name in done.stdout
    bad = subprocess.run([sys.executable, "-m", "moetion.cli", "plan", "--preset", "deepseek-moe-16b", "--mtbf", "0.1s"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "shorter than one iteration" in bad.stderr


def test_expert_parallelism_adds_the_all_to_all_log_option_with_its_bytes_and_replay_time():
    from moetion.planner.cost import EP_LOG_APPROACH, all_to_all_bytes_per_iteration
    from moetion.planner.report import build_rows, format_table

    model = _small_model(pipeline_stages=2, total_params=10000, expert_parallel=2)
    # 1 layer x 2 micro-batches x 4 crossings x (1.25 x 8 tokens x top-2 rows x 4 hidden x 2 B) x 1/2 leaving
    assert all_to_all_bytes_per_iteration(model) == 1 * 2 * 4 * (1.25 * 8 * 2 * 4 * 2) / 2
    assert all_to_all_bytes_per_iteration(_small_model()) == 0.0
    costs = plan_approaches(model, _hardware(), mtbf_s=3600)
    group, logged = costs["moevement"], costs[EP_LOG_APPROACH]
    assert logged.log_bytes_per_iteration == group.log_bytes_per_iteration + all_to_all_bytes_per_iteration(model)
    assert logged.host_memory_bytes > group.host_memory_bytes
    # network 1 GB/s, device->host 1 GB/s: re-reading the log costs what the exchange did
    assert logged.replay_speedup == pytest.approx(group.replay_speedup)
    faster_host = plan_approaches(model, _hardware(d2h_bytes_per_s=1e10), mtbf_s=3600)[EP_LOG_APPROACH]
    assert faster_host.replay_speedup > group.replay_speedup
    assert EP_LOG_APPROACH not in plan_approaches(_small_model(), _hardware(), mtbf_s=3600)
    table = format_table(build_rows(model, _hardware(), mtbf_s=3600, runs=0))
    assert "MoEvement, a2a log (b)" in table and "MoEvement (sparse)" in table
