"""``moetion plan``: what fault tolerance buys at a user's scale.

A planner, not a runtime: from a model and cluster description it estimates, per approach
(MoEvement-style sparse checkpointing as this project implements it, CheckFreq-, Gemini- and
MoC-style alternatives), the checkpoint overhead, window or interval, recovery time, host memory
and the effective training time ratio (ETTR), analytically and by Monte-Carlo simulation.

The sparse-checkpoint window comes from the runtime's own scheduler (:mod:`moetion.window`), so
the plan and the runtime cannot disagree about W for the same byte counts.
"""
from moetion.planner.cost import ApproachCost, HardwareSpec, ModelSpec, plan_approaches, young_daly_interval_s
from moetion.planner.ettr import SimulationResult, analytic_ettr, simulate_ettr
from moetion.planner.presets import PRESETS, preset
from moetion.planner.report import PlanRow, build_rows, format_table, recommend

__all__ = [
    "ApproachCost",
    "HardwareSpec",
    "ModelSpec",
    "PRESETS",
    "PlanRow",
    "SimulationResult",
    "analytic_ettr",
    "build_rows",
    "format_table",
    "plan_approaches",
    "preset",
    "recommend",
    "simulate_ettr",
    "young_daly_interval_s",
]
