"""Engine configuration: dataclasses loadable from a dict or JSON file, strict about unknown keys.

Strictness matters because a misspelt key (``micro_batchs``) silently falling back to a default
would change the training run without anyone noticing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from logging_store.codecs import check_level, parse_codec
from logging_store.errors import InvalidArgumentError
from moetion.config_types import check_field_types
from moetion.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
LR_DECAYS = ("constant", "linear", "cosine")
CODECS = ("none", "lz4", "zstd")


DEFAULT_SHM_DIR = f"/dev/shm/moetion-{os.geteuid()}"  # per user: other users cannot reach it


@dataclass
class LRScheduleConfig:
    """Learning rate as a pure function of the iteration: linear warm-up, then optional decay.

    The factor multiplies each optimizer param group's initial ``lr``. Being a function of the
    iteration (not of mutable scheduler state) is what lets a replay use each iteration's own LR.
    """

    warmup_iterations: int = 0
    decay: str = "constant"
    decay_iterations: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self, prefix="lr_schedule.")
        if self.warmup_iterations < 0:
            raise ConfigError(f"lr_schedule.warmup_iterations must be >= 0, got {self.warmup_iterations}")
        if self.decay not in LR_DECAYS:
            raise ConfigError(f"lr_schedule.decay must be one of {LR_DECAYS}, got {self.decay!r}")
        if self.decay != "constant" and self.decay_iterations < 1:
            raise ConfigError(
                f"lr_schedule.decay={self.decay!r} needs decay_iterations >= 1 "
                f"(iterations after warm-up to reach min_ratio), got {self.decay_iterations}"
            )
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(f"lr_schedule.min_ratio must lie in [0, 1], got {self.min_ratio}")


@dataclass
class SnapshotConfig:
    """Sparse checkpointing (DESIGN.md §2.1, §4).

    Attributes:
        enabled: capture a sparse snapshot after every optimizer step.
        window: pin W; ``None`` chooses it with Algorithm 1 from measured iteration time and copy
            bandwidth, re-decided at every window boundary.
        bandwidth_gbps: pin the snapshot bandwidth (GB/s) instead of measuring it (on CPU: GB
            captured per CPU-second of the snapshot threads).
        budget_fraction: the share of an iteration the snapshots may cost. With CUDA the budget is
            ``fraction x iteration time x copy bandwidth`` and ``None`` means 1.0 (copies run on the
            DMA engine behind compute, the paper's assumption). On CPU, where they take cores from
            training, it is ``fraction x training-thread CPU-seconds per iteration / snapshot-thread
            CPU-seconds per captured byte`` (both measured) and ``None`` means 0.04: the snapshot
            threads use about 4% of the training thread's CPU (docs/snapshots.md).
        shm_dir: node-local shared-memory root; windows there survive the capturing process. Must be
            a 0700 directory of this user (created so if missing): the default is per user.
        run_id: names this job's directory under ``shm_dir`` and ``persist_dir`` ([A-Za-z0-9._-]);
            ``None`` means ``MOETION_RUN_ID`` from the environment, else an unpredictable id derived
            from the job secret (set one to resume a run later).
        replicate: send each complete window to a peer stage's host over a gloo group of its own.
        persist_dir: also write every ``persist_every``-th complete window there (asynchronously).
        keep_persisted: persisted windows kept per stage replica (older ones are pruned).
        persist_codec: ``"none"`` writes a window's blob raw; ``"lz4"`` or ``"zstd"`` write it
            delta-compressed (compute snapshots as XOR against the previous capture, shuffled and
            compressed, on the persisting thread; :mod:`moetion.snapshot.delta`), exact on load.
        reorder_change / reorder_fraction: re-order experts at a window boundary when at least
            ``reorder_fraction`` of them changed popularity by more than ``reorder_change``.
    """

    enabled: bool = False
    window: int | None = None
    bandwidth_gbps: float | None = None
    budget_fraction: float | None = None
    shm_dir: str = DEFAULT_SHM_DIR
    run_id: str | None = None
    replicate: bool = True
    persist_dir: str | None = None
    persist_every: int = 1
    keep_persisted: int = 2
    persist_codec: str = "none"
    reorder_change: float = 0.10
    reorder_fraction: float = 0.25

    def __post_init__(self) -> None:
        check_field_types(self, prefix="snapshot.")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"snapshot.window must be >= 1 or null (automatic), got {self.window}")
        if self.bandwidth_gbps is not None and self.bandwidth_gbps <= 0:
            raise ConfigError(f"snapshot.bandwidth_gbps must be > 0 or null (measured), got {self.bandwidth_gbps}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise ConfigError(f"snapshot.budget_fraction must lie in (0, 1] or be null (automatic), got {self.budget_fraction}")
        if self.persist_every < 1 or self.keep_persisted < 1:
            raise ConfigError("snapshot.persist_every and snapshot.keep_persisted must be >= 1")
        if self.persist_codec not in CODECS:
            raise ConfigError(f"snapshot.persist_codec must be one of {CODECS}, got {self.persist_codec!r}")
        if not (0 < self.reorder_change and 0 < self.reorder_fraction <= 1):
            raise ConfigError("snapshot.reorder_change must be > 0 and reorder_fraction in (0, 1]")


@dataclass
class UpstreamLogConfig:
    """Upstream logging (DESIGN.md §2.3): what each stage sent, kept for replaying a neighbour.

    Attributes:
        enabled: log boundary tensors and per-iteration decisions; needs ``snapshot.enabled``,
            because logs are kept exactly from the start of the latest complete window on.
        codec / level / shuffle: how ``logging_store`` compresses entries in the background.
        budget_bytes / spill_dir: beyond this much host memory, the oldest entries spill to disk,
            into a private (0700) directory made under ``spill_dir`` (default: the system temp
            directory). ``None`` sizes the budget from the machine when the engine starts (see
            :func:`moetion.memory_budget.default_log_budget`), so logs can never fill the host.
    """

    enabled: bool = False
    codec: str = "lz4"
    level: int | None = None
    shuffle: bool = True
    budget_bytes: int | None = None
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, prefix="upstream_log.")
        if self.codec not in CODECS:
            raise ConfigError(f"upstream_log.codec must be one of {CODECS}, got {self.codec!r}")
        try:
            check_level(parse_codec(self.codec), self.level)
        except InvalidArgumentError as error:
            raise ConfigError(f"upstream_log.level: {error}") from None
        if self.budget_bytes is not None and self.budget_bytes < 0:
            raise ConfigError(
                f"upstream_log.budget_bytes must be >= 0 or null (sized from the machine), got {self.budget_bytes}")


@dataclass
class DeterminismConfig:
    """What moetion does so that any model code replays bit for bit (docs/randomness.md).

    Attributes:
        torch_generators: set torch's default generators (CPU, and the stage's CUDA device) to a
            state derived from the seed and the coordinates of each unit of work, and restore
            them after it. Turning it off leaves torch's generators (and so moetion's own draws)
            to process history: a replacement then does not replay exactly. It exists to show that.
        strict: ``torch.use_deterministic_algorithms(True)``; an op without a deterministic
            implementation on the device stops the first iteration with its name.
    """

    torch_generators: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        for name in ("torch_generators", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"determinism.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass
class MetricsConfig:
    """Per-rank metrics as JSON lines (docs/metrics.md), read by ``moetion report``.

    Attributes:
        dir: the run directory; each rank appends to ``<dir>/metrics/rank-<rank>.jsonl``.
            ``None`` writes no metrics.
        tensorboard: also write TensorBoard scalars under ``<dir>/metrics/tensorboard`` (needs
            ``pip install 'moetion[tensorboard]'``).
    """

    dir: str | None = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.dir is not None and not (isinstance(self.dir, str) and self.dir):
            raise ConfigError(f"metrics.dir must be a non-empty path or null (no metrics), got {self.dir!r}")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"metrics.tensorboard must be true or false, got {self.tensorboard!r}")
        if self.tensorboard and self.dir is None:
            raise ConfigError("metrics.tensorboard needs metrics.dir (the run directory it writes under)")


@dataclass
class Config:
    """Everything the pipeline engine needs besides the model, the optimizer and the data.

    Attributes:
        seed: root of every random draw (initialisation, dropout, router noise, data order).
        micro_batches: M, micro-batches per iteration and per data-parallel replica.
        precision: ``"fp32"``, or ``"bf16"`` compute with fp32 master weights and gradients.
        grad_clip: global max gradient norm across all stages and replicas; ``None`` disables.
        lr_schedule: warm-up and decay of the learning rate, see :class:`LRScheduleConfig`.
        threads: intra-op threads per rank; ``None`` means cores // local ranks (at least 1), one core
            left free when that would fill every core (:func:`moetion.threads.default_threads`).
            Replay must use the same count, so it is recorded.
        peer_timeout_s: bound on every wait for a peer; a dead or hung peer becomes a
            :class:`~moetion.errors.PeerFailure` naming the rank instead of a hang.
        snapshot: sparse checkpointing, see :class:`SnapshotConfig`.
        upstream_log: logging of boundary tensors for replay, see :class:`UpstreamLogConfig`.
        determinism: torch's generators per unit of work and the strict mode, see
            :class:`DeterminismConfig`.
        metrics: per-rank metrics files, see :class:`MetricsConfig`.
    """

    seed: int = 0
    micro_batches: int = 4
    precision: str = "fp32"
    grad_clip: float | None = 1.0
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    threads: int | None = None
    peer_timeout_s: float = 300.0
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    upstream_log: UpstreamLogConfig = field(default_factory=UpstreamLogConfig)
    determinism: DeterminismConfig = field(default_factory=DeterminismConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        check_field_types(self, prefix="")
        if self.micro_batches < 1:
            raise ConfigError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 or null (automatic), got {self.threads}")
        if self.peer_timeout_s <= 0:
            raise ConfigError(f"peer_timeout_s must be > 0, got {self.peer_timeout_s}")
        if self.upstream_log.enabled and not self.snapshot.enabled:
            raise ConfigError(
                "upstream_log.enabled needs snapshot.enabled: logs are kept from the latest complete "
                "snapshot window on, and are useless without one"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Config":
        """Builds a config from plain data; an unknown key is an error naming the key."""
        return _from_mapping(cls, values, path="")

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        """Reads a JSON file holding the same keys as :meth:`from_dict`."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_mapping(cls: type, values: Mapping[str, Any], *, path: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {path.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {path + unknown[0]!r}; known keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_mapping(hint, value, path=f"{path}{name}.")
        kwargs[name] = value
    return cls(**kwargs)
