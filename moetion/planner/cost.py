"""Cost model: bytes, windows, intervals and recovery times per fault-tolerance approach.

Everything is computed for the *busiest* pipeline stage on one rank, because a synchronous
pipeline runs at the pace of its slowest stage and every rank of a stage copies its own state in
parallel with the others. Bandwidths in :class:`HardwareSpec` are therefore per GPU.

Assumptions shared by all approaches (stated once, used everywhere):

* Full training state per parameter = fp32 master weight (4 B) + Adam ``exp_avg``/``exp_avg_sq``
  (8 B) = 12 B, the same accounting as :meth:`moetion.operators.Operator.full_bytes`.
* A compute snapshot stores the weights forward reads: 2 B/param under bf16, 4 B under fp32.
* Copies that fit inside one iteration overlap with compute and cost no stall; copies that do not
  fit stall training for their whole duration (the conservative end).
* Replay and redo run at the normal iteration speed (replaying one stage is usually faster; so
  MoEvement recovery here is an upper estimate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from moetion.errors import ConfigError
from moetion.operators import Operator
from moetion.window import capture_budget_bytes, find_window_size, slot_cost, snapshot_order, split_into_slots

FULL_BYTES_PER_PARAM = 4 + 8
GB = 1e9
APPROACHES = ("moevement", "checkfreq", "gemini", "moc")
# With expert parallelism, "moevement" is option (a) (a lost rank's stage replays together, the
# all-to-all live); this row is option (b): log what crosses the all-to-all, replay the rank alone.
EP_LOG_APPROACH = "moevement-a2a-log"


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What the model looks like to the checkpointing code.

    ``params_per_stage`` is the busiest stage's parameter count including all its experts; when
    omitted it is ``total_params / pipeline_stages`` (an even split). Each of the stage's layers
    (``moe_layers_per_stage`` + ``dense_layers_per_stage``) contributes one dense operator holding
    its non-expert parameters (attention, router, shared experts, norms; embeddings are folded
    in evenly); each MoE layer contributes ``experts_per_layer / expert_parallel`` expert
    operators on a rank.
    """

    name: str = "custom"
    total_params: float
    pipeline_stages: int
    experts_per_layer: int
    expert_params: float
    moe_layers_per_stage: int
    dense_layers_per_stage: int = 0
    params_per_stage: float | None = None
    data_parallel: int = 1
    expert_parallel: int = 1
    precision: str = "bf16"
    micro_batches: int = 8
    micro_batch_tokens: int = 4096
    hidden_size: int = 2048
    top_k: int = 2
    capacity_factor: float = 1.25

    def __post_init__(self) -> None:
        for name in ("total_params", "expert_params"):
            _positive(name, getattr(self, name))
        for name in ("pipeline_stages", "experts_per_layer", "moe_layers_per_stage", "data_parallel",
                     "expert_parallel", "micro_batches", "micro_batch_tokens", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dense_layers_per_stage, int) or self.dense_layers_per_stage < 0:
            raise ConfigError(f"dense_layers_per_stage must be an integer >= 0, got {self.dense_layers_per_stage!r}")
        if self.params_per_stage is not None:
            _positive("params_per_stage", self.params_per_stage)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.experts_per_layer:
            raise ConfigError(f"top_k must be an integer in [1, experts_per_layer], got {self.top_k!r}")
        _positive("capacity_factor", self.capacity_factor)
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.experts_per_layer % self.expert_parallel:
            raise ConfigError(f"experts_per_layer ({self.experts_per_layer}) must be divisible by "
                              f"expert_parallel ({self.expert_parallel})")
        if self.dense_params_per_layer < 0:
            raise ConfigError(
                f"{self.name}: the stage's experts ({self.moe_layers_per_stage} layers x {self.experts_per_layer} x "
                f"{self.expert_params:.3g} params) exceed params_per_stage ({self.stage_params:.3g}); "
                "check expert_params or params_per_stage"
            )

    @property
    def stage_params(self) -> float:
        return self.params_per_stage if self.params_per_stage is not None else self.total_params / self.pipeline_stages

    @property
    def layers_per_stage(self) -> int:
        return self.moe_layers_per_stage + self.dense_layers_per_stage

    @property
    def dense_params_per_layer(self) -> float:
        experts = self.moe_layers_per_stage * self.experts_per_layer * self.expert_params
        return (self.stage_params - experts) / self.layers_per_stage

    @property
    def local_experts_per_layer(self) -> int:
        return self.experts_per_layer // self.expert_parallel

    @property
    def rank_params(self) -> float:
        """Parameters one rank of the busiest stage holds (its expert shard plus all dense ones)."""
        return (self.layers_per_stage * self.dense_params_per_layer
                + self.moe_layers_per_stage * self.local_experts_per_layer * self.expert_params)

    @property
    def compute_bytes_per_param(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens_per_iteration(self) -> float:
        return float(self.micro_batches * self.micro_batch_tokens * self.data_parallel)


@dataclass(frozen=True, kw_only=True)
class HardwareSpec:
    """Per-GPU figures of the cluster, plus the times a failure costs before any replay/redo.

    ``respawn_s``: replacing one failed worker while the others wait (localized recovery);
    ``restart_s``: tearing down and relaunching the whole job (global rollback approaches).
    """

    iteration_s: float
    device_to_host_gbps: float
    network_gbps: float
    disk_gbps: float
    respawn_s: float = 30.0
    restart_s: float = 120.0
    gpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("iteration_s", "device_to_host_gbps", "network_gbps", "disk_gbps"):
            _positive(name, getattr(self, name))
        for name in ("respawn_s", "restart_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ApproachCost:
    """One approach's costs. ``interval`` is W (sparse window) or I (checkpoint interval), in iterations.

    Recovery after a failure = ``fixed_recovery_s`` + (``replay_base_iterations`` + position in the
    current interval) iterations, the position being uniform in [0, interval): E = base + I/2. Those
    iterations run ``replay_speedup`` times faster than training's (1: re-execution at full cost;
    a lone replaying stage has no pipeline bubbles, measured 1.8-4x on CPU).
    """

    approach: str
    interval: int
    interval_kind: str
    iteration_s: float
    checkpoint_stall_s: float
    snapshot_bytes_per_iteration: float
    log_bytes_per_iteration: float
    host_memory_bytes: float
    fixed_recovery_s: float
    replay_base_iterations: float
    lost_tokens_fraction: float | None = None
    replay_speedup: float = 1.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def overhead_fraction(self) -> float:
        """Stall per iteration relative to the iteration time: T_ckpt / (T_iter * I)."""
        return self.checkpoint_stall_s / (self.iteration_s * self.interval)

    @property
    def wall_iteration_s(self) -> float:
        return self.iteration_s * (1.0 + self.overhead_fraction)

    @property
    def replay_iteration_s(self) -> float:
        return self.wall_iteration_s / self.replay_speedup

    @property
    def expected_recovery_s(self) -> float:
        return self.fixed_recovery_s + (self.replay_base_iterations + self.interval / 2) * self.replay_iteration_s

    @property
    def worst_recovery_s(self) -> float:
        return self.fixed_recovery_s + (self.replay_base_iterations + self.interval) * self.replay_iteration_s


def young_daly_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's first-order optimal checkpoint interval sqrt(2 * T_ckpt * MTBF), in seconds."""
    _positive("checkpoint_s", checkpoint_s)
    _positive("mtbf_s", mtbf_s)
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


def young_daly_interval_iterations(checkpoint_s: float, mtbf_s: float, iteration_s: float) -> int:
    """The Young/Daly interval rounded to whole iterations (at least one)."""
    return max(1, round(young_daly_interval_s(checkpoint_s, mtbf_s) / iteration_s))


def synthetic_operators(model: ModelSpec) -> list[Operator]:
    """The busiest rank's operators as the runtime would discover them, sized from the description."""
    ops = []
    for layer in range(model.layers_per_stage):
        if layer < model.moe_layers_per_stage:
            for expert in range(model.local_experts_per_layer):
                ops.append(Operator(name=f"layer{layer}.expert{expert}", kind="expert", param_names=(),
                                    numel=int(model.expert_params), num_tensors=0))
        ops.append(Operator(name=f"layer{layer}.dense", kind="dense", param_names=(),
                            numel=int(model.dense_params_per_layer), num_tensors=0))
    return ops


@dataclass(frozen=True)
class WindowPlan:
    window: int
    max_slot_bytes: float
    mean_slot_bytes: float
    budget_bytes: float


def sparse_window(model: ModelSpec, hardware: HardwareSpec) -> WindowPlan:
    """W from the runtime's Algorithm 1 on synthetic byte counts (uniform popularity).

    Budget = one iteration of device->host copy time. Raises the runtime's ConfigError when even
    one operator per slot does not fit.
    """
    ops = synthetic_operators(model)
    order = snapshot_order(ops, {})
    full = {op.name: op.full_bytes(optimizer_bytes_per_param=8) for op in ops}
    compute = {op.name: op.compute_bytes(precision=model.precision) for op in ops}
    budget = capture_budget_bytes(fraction=1.0, seconds_per_iteration=hardware.iteration_s,
                                  seconds_per_byte=1 / (hardware.device_to_host_gbps * GB))
    window = find_window_size(order, full=full, compute=compute, budget_bytes=budget)
    slots = split_into_slots(order, window)
    costs = [slot_cost(slots, i, full=full, compute=compute) for i in range(window)]
    return WindowPlan(window, max(costs), sum(costs) / window, budget)


def upstream_log_bytes_per_iteration(model: ModelSpec) -> float:
    """Activation + gradient per micro-batch at each of the stage's (at most two) boundaries.

    One boundary tensor = micro-batch tokens x hidden x bytes per element; logged once forward
    (activation) and once backward (gradient).
    """
    boundaries = min(2, model.pipeline_stages - 1)
    per_tensor = model.micro_batch_tokens * model.hidden_size * model.compute_bytes_per_param
    return float(model.micro_batches * boundaries * per_tensor * 2)


def all_to_all_bytes_per_iteration(model: ModelSpec) -> float:
    """What leaves one rank through its MoE layers' all-to-alls in one iteration.

    Per MoE layer and micro-batch the capacity-padded dispatch buffer holds ``capacity_factor x
    tokens x top_k`` rows of ``hidden_size``; the share ``(E-1)/E`` goes to the other ranks of the
    expert-parallel group, and the buffer crosses four times: dispatch and combine forward, their
    gradients backward. Zero without expert parallelism.
    """
    e = model.expert_parallel
    rows = model.capacity_factor * model.micro_batch_tokens * model.top_k
    per_exchange = rows * model.hidden_size * model.compute_bytes_per_param * (e - 1) / e
    return float(model.moe_layers_per_stage * model.micro_batches * 4 * per_exchange)


def plan_approaches(model: ModelSpec, hardware: HardwareSpec, *, mtbf_s: float,
                    moc_expert_fraction: float = 0.25) -> dict[str, ApproachCost]:
    """Costs of every approach for this model, cluster and MTBF."""
    _positive("mtbf_s", mtbf_s)
    if mtbf_s < hardware.iteration_s:
        raise ConfigError(f"MTBF ({mtbf_s:g} s) is shorter than one iteration ({hardware.iteration_s:g} s): "
                          "no approach can make progress; check the units (e.g. 10m, 2h)")
    if not 0 < moc_expert_fraction <= 1:
        raise ConfigError(f"moc_expert_fraction must be in (0, 1], got {moc_expert_fraction}")
    t = hardware.iteration_s
    dense_bytes = model.rank_params * FULL_BYTES_PER_PARAM
    costs = {
        "moevement": _moevement(model, hardware),
        "checkfreq": _checkfreq(hardware, dense_bytes, mtbf_s),
        "gemini": _gemini(hardware, dense_bytes, mtbf_s),
        "moc": _moc(model, hardware, dense_bytes, mtbf_s, moc_expert_fraction, t),
    }
    if model.expert_parallel > 1:
        costs[EP_LOG_APPROACH] = _moevement_a2a_log(model, hardware, costs["moevement"])
    return costs


def _moevement(model: ModelSpec, hardware: HardwareSpec) -> ApproachCost:
    plan = sparse_window(model, hardware)
    log = upstream_log_bytes_per_iteration(model)
    # The window was chosen so snapshots fit the copy budget; logs share the same link, so only
    # what exceeds one iteration of device->host time stalls.
    excess = (plan.max_slot_bytes + log) / (hardware.device_to_host_gbps * GB) - hardware.iteration_s
    return ApproachCost(
        approach="moevement", interval=plan.window, interval_kind="W", iteration_s=hardware.iteration_s,
        checkpoint_stall_s=max(0.0, excess) * plan.window,
        snapshot_bytes_per_iteration=plan.mean_slot_bytes, log_bytes_per_iteration=log,
        host_memory_bytes=plan.window * log + 2 * plan.window * plan.mean_slot_bytes,
        fixed_recovery_s=hardware.respawn_s, replay_base_iterations=plan.window,
        notes=("localized recovery: respawn + replay W..2W iterations (E = 1.5 W)",) + (
            ("expert parallelism, option (a): the lost rank's stage replays together, the all-to-all live",)
            if model.expert_parallel > 1 else ()),
    )


def _moevement_a2a_log(model: ModelSpec, hardware: HardwareSpec, group_replay: ApproachCost) -> ApproachCost:
    """Option (b) of expert-parallel recovery against option (a), ``group_replay``.

    Every iteration also logs what the rank sends through the all-to-all (more device->host bytes
    and host memory, a stall when they no longer fit an iteration); in exchange the lost rank
    replays alone, reading those chunks from host memory instead of exchanging them over the
    network, and no survivor re-executes anything.
    """
    plan = sparse_window(model, hardware)
    exchanged = all_to_all_bytes_per_iteration(model)
    log = group_replay.log_bytes_per_iteration + exchanged
    excess = (plan.max_slot_bytes + log) / (hardware.device_to_host_gbps * GB) - hardware.iteration_s
    t = hardware.iteration_s
    network_s, reread_s = exchanged / (hardware.network_gbps * GB), exchanged / (hardware.device_to_host_gbps * GB)
    return ApproachCost(
        approach=EP_LOG_APPROACH, interval=plan.window, interval_kind="W", iteration_s=t,
        checkpoint_stall_s=max(0.0, excess) * plan.window,
        snapshot_bytes_per_iteration=plan.mean_slot_bytes, log_bytes_per_iteration=log,
        host_memory_bytes=plan.window * log + 2 * plan.window * plan.mean_slot_bytes,
        fixed_recovery_s=hardware.respawn_s, replay_base_iterations=plan.window,
        replay_speedup=group_replay.replay_speedup * t / max(t - network_s + reread_s, 1e-9 * t),
        notes=("expert parallelism, option (b): the all-to-all is logged, the lost rank replays alone",),
    )


def _checkfreq(hardware: HardwareSpec, dense_bytes: float, mtbf_s: float) -> ApproachCost:
    write_s = dense_bytes / (hardware.disk_gbps * GB)
    interval = young_daly_interval_iterations(write_s, mtbf_s, hardware.iteration_s)
    return ApproachCost(
        approach="checkfreq", interval=interval, interval_kind="I", iteration_s=hardware.iteration_s,
        checkpoint_stall_s=write_s, snapshot_bytes_per_iteration=dense_bytes / interval, log_bytes_per_iteration=0.0,
        host_memory_bytes=dense_bytes, fixed_recovery_s=hardware.restart_s + write_s, replay_base_iterations=0.0,
        notes=("dense checkpoint to disk at the Young/Daly interval; global restart + reload + I/2 redo",),
    )


def _gemini(hardware: HardwareSpec, dense_bytes: float, mtbf_s: float) -> ApproachCost:
    copy_s = max(dense_bytes / (hardware.device_to_host_gbps * GB), dense_bytes / (hardware.network_gbps * GB))
    if copy_s <= hardware.iteration_s:
        interval, stall = 1, 0.0
    else:
        interval, stall = young_daly_interval_iterations(copy_s, mtbf_s, hardware.iteration_s), copy_s
    return ApproachCost(
        approach="gemini", interval=interval, interval_kind="I", iteration_s=hardware.iteration_s,
        checkpoint_stall_s=stall, snapshot_bytes_per_iteration=dense_bytes / interval, log_bytes_per_iteration=0.0,
        host_memory_bytes=2 * dense_bytes,  # its own copy plus a peer's
        fixed_recovery_s=hardware.restart_s + dense_bytes / (hardware.network_gbps * GB), replay_base_iterations=0.0,
        notes=("dense checkpoint to peer host memory; every iteration when it fits, else Young/Daly",),
    )


def _moc(model: ModelSpec, hardware: HardwareSpec, dense_bytes: float, mtbf_s: float,
         fraction: float, t: float) -> ApproachCost:
    """Partial-expert checkpointing: dense parts plus ``fraction`` of the experts, round robin.

    Assumption for lost tokens: uniform routing; an expert is saved every 1/fraction checkpoints,
    so at a failure a non-saved expert's state is on average (1/fraction) * I / 2 iterations old.
    Recovery keeps running with those stale experts instead of replaying, so the tokens routed to
    the not-checkpointed experts during that staleness are lost: per failure
    (1 - fraction) * staleness * tokens per iteration, reported as a fraction of the tokens
    trained between failures (MTBF / T_iter iterations).
    """
    experts = model.moe_layers_per_stage * model.local_experts_per_layer * model.expert_params
    saved = (model.rank_params - experts * (1 - fraction)) * FULL_BYTES_PER_PARAM
    write_s = max(saved / (hardware.device_to_host_gbps * GB), saved / (hardware.network_gbps * GB))
    if write_s <= t:
        interval, stall = 1, 0.0
    else:
        interval, stall = young_daly_interval_iterations(write_s, mtbf_s, t), write_s
    staleness = interval / fraction / 2
    lost = min(1.0, (1 - fraction) * staleness / (mtbf_s / t))
    return ApproachCost(
        approach="moc", interval=interval, interval_kind="I", iteration_s=t, checkpoint_stall_s=stall,
        snapshot_bytes_per_iteration=saved / interval, log_bytes_per_iteration=0.0, host_memory_bytes=2 * saved,
        fixed_recovery_s=hardware.restart_s + saved / (hardware.network_gbps * GB), replay_base_iterations=0.0,
        lost_tokens_fraction=lost,
        notes=(f"partial experts ({fraction:.0%} per checkpoint, round robin) to peer memory; "
               "stale experts are kept, their tokens lost",),
    )
