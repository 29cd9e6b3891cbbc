"""Per-rank metrics: one JSON object per line, for every committed iteration, window and recovery.

Each rank appends to ``<metrics.dir>/metrics/rank-<rank>.jsonl``; a replacement appends to its
predecessor's file, so a rank's file is its whole history. The records below are the schema
(documented in docs/metrics.md); :func:`parse_record` checks a line against them, key for key and
type for type, and is what ``moetion report`` reads with.

Cost on the training thread: the engine calls :meth:`RankMetrics.after_commit` once per iteration,
after the optimizer step. It formats one line and hands it to the OS with one ``write`` (no fsync:
a line written survives the process being killed, not the machine losing power). The time it
takes is measured and reported in the next iteration's ``metrics_ms``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union

from moetion.errors import ConfigError, MoetionError
from moetion.profiling import CAPTURE, COPIED, FENCE, LEDGER, LOG_PUT, LOGGED, PROPOSE, CostSnapshot
from moetion.recovery.records import RecoveryEvents

if TYPE_CHECKING:
    from moetion.engine import PipelineEngine

METRICS_SUBDIR = "metrics"


class MetricsError(MoetionError):
    """A metrics line that does not match the schema, or a run directory without metrics."""


@dataclass(frozen=True)
class IterationRecord:
    """One committed iteration as this rank saw it."""

    kind: ClassVar[str] = "iteration"
    rank: int
    stage: int
    replica: int
    generation: int
    time: float  # wall clock (time.time()) at the commit
    iteration: int
    loss: float  # the job's mean loss of the iteration (the same on every rank)
    grad_norm: float  # global, before clipping
    clip_coef: float
    lr_factor: float
    iteration_ms: float  # train_batch's own iteration, start to commit
    capture_ms: float  # of it, the training thread inside the sparse checkpointer
    logging_ms: float  # of it, the training thread inside the upstream log
    metrics_ms: float  # the training thread writing the previous metrics line(s)
    snapshot_bytes: int  # bytes this iteration handed to the capture worker
    log_bytes: int  # raw bytes this iteration logged
    log_host_bytes: int  # host memory the upstream log store holds now (resident + pooled)
    window_host_bytes: int  # host memory windows hold now (shared memory + a peer's replica)


@dataclass(frozen=True)
class WindowRecord:
    """A sparse-checkpoint window this rank started capturing, or saw complete in shared memory."""

    kind: ClassVar[str] = "window"
    rank: int
    stage: int
    replica: int
    generation: int
    time: float
    event: str  # "started" or "completed"
    start: int  # the window's first iteration
    window: int  # W
    bytes: int  # the window's blob (0 for "started": laid out at its first capture)
    tiers: dict[str, int]  # bytes held now per tier: shm, peer, disk


@dataclass(frozen=True)
class RecoveryRecord:
    """One rank's side of one recovery: the typed events of :mod:`moetion.recovery.coordinator`.

    Times are wall clock; a field a role does not pass through is null (a survivor restores
    nothing; a replacement detects nothing).
    """

    kind: ClassVar[str] = "recovery"
    rank: int
    stage: int
    replica: int
    generation: int
    time: float
    role: str  # "survivor" or "replacement"
    resume: int  # the iteration the job resumed at
    cause: Union[str, None]
    iteration: Union[int, None]  # a survivor's in-flight iteration, abandoned
    inflight_s: Union[float, None]  # the in-flight work it discarded
    detected_at: Union[float, None]
    joined_at: float
    restore_at: Union[float, None]  # a replacement reached train_batch
    state_loaded_at: Union[float, None]
    logs_received_at: Union[float, None]
    ready_at: Union[float, None]  # replayed to ``resume``
    resumed_at: float
    source: Union[str, None]  # the tier it restored from
    replayed: Union[int, None]
    replay_s: Union[float, None]
    bytes_sent: Union[int, None]
    bytes_received: Union[int, None]
    retries: int  # generations that failed during this recovery


Record = Union[IterationRecord, WindowRecord, RecoveryRecord]
RECORDS: dict[str, type] = {r.kind: r for r in (IterationRecord, WindowRecord, RecoveryRecord)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in RECORDS.values()}


def metrics_path(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / METRICS_SUBDIR / f"rank-{rank}.jsonl"


def to_line(record: Record) -> str:
    values = {"kind": record.kind, **{name: getattr(record, name) for name in _FIELDS[type(record)]}}
    return json.dumps(values, separators=(",", ":")) + "\n"


def parse_record(line: str) -> Record:
    """The record a line holds; :class:`MetricsError` unless it has exactly the schema's keys and types."""
    try:
        values = json.loads(line)
    except json.JSONDecodeError as error:
        raise MetricsError(f"expected one JSON object per line, found {line[:60]!r} ({error})") from None
    if not isinstance(values, dict) or values.get("kind") not in RECORDS:
        raise MetricsError(f"expected a record with kind in {sorted(RECORDS)}, found {line[:60]!r}")
    cls = RECORDS[values.pop("kind")]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    if sorted(values) != sorted(fields):
        missing, extra = sorted(set(fields) - set(values)), sorted(set(values) - set(fields))
        raise MetricsError(f"{cls.kind} record: missing keys {missing}, unexpected keys {extra}")
    for name in fields:
        if not _has_type(values[name], hints[name]):
            raise MetricsError(f"{cls.kind} record: {name} should be {hints[name]}, found {values[name]!r}")
    return cls(**values)


def read_run(run_dir: str | Path) -> dict[int, list[Record]]:
    """Every rank's records, in the order written; :class:`MetricsError` if the run has none."""
    folder = Path(run_dir) / METRICS_SUBDIR
    files = sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []
    if not files:
        raise MetricsError(f"expected metrics files {folder}/rank-<N>.jsonl, found none: was metrics.dir set to {run_dir}?")
    runs = {}
    for path in files:
        with path.open() as lines:
            runs[int(path.stem.split("-")[1])] = [parse_record(line) for line in lines if line.strip()]
    return runs


def _has_type(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is Union:
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(hint) is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_has_type(k, key) and _has_type(v, item) for k, v in value.items())
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


class RankMetrics:
    """Writes one rank's records; owned by its engine (see :func:`open_rank_metrics`)."""

    def __init__(self, path: Path, *, rank: int, stage: int, replica: int, tensorboard: bool = False) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._ids = {"rank": rank, "stage": stage, "replica": replica}
        self._write_s = 0.0
        self._costs = LEDGER.snapshot()
        self._window: tuple[int, int] | None = None
        self._completed_start: int | None = None
        self._board = _tensorboard(path.parent / "tensorboard" / f"rank-{rank}") if tensorboard else None

    def after_commit(self, engine: "PipelineEngine") -> None:
        """Call once per committed iteration, after the optimizer step, on the training thread."""
        start = time.perf_counter()
        stats, ckpt, upstream = engine.last_stats, engine.checkpointer, engine.upstream
        costs = self._costs_since_last()
        tiers = ckpt.tier_bytes() if ckpt else {}
        log_stats = upstream.store.stats() if upstream else None
        now = time.time()
        records: list[Record] = [IterationRecord(
            **self._common(engine, now), iteration=stats.iteration, loss=stats.loss, grad_norm=stats.grad_norm,
            clip_coef=stats.clip_coef, lr_factor=stats.lr_factor, iteration_ms=stats.seconds * 1e3,
            capture_ms=sum(costs.blocked_s.get(c, 0.0) for c in (FENCE, CAPTURE, PROPOSE)) * 1e3,
            logging_ms=costs.blocked_s.get(LOG_PUT, 0.0) * 1e3, metrics_ms=self._write_s * 1e3,
            snapshot_bytes=costs.bytes.get(COPIED, 0), log_bytes=costs.bytes.get(LOGGED, 0),
            log_host_bytes=log_stats.resident_bytes + log_stats.pool_free_bytes if log_stats else 0,
            window_host_bytes=tiers.get("shm", 0) + tiers.get("peer", 0),
        )]
        if ckpt is not None:
            records += self._window_records(engine, now, tiers)
        self._write_s = 0.0
        self._write(records)
        if self._board is not None:
            self._board.add_scalars_of(records[0])
        self._write_s += time.perf_counter() - start

    def recovery(self, engine: "PipelineEngine", generation: int, events: RecoveryEvents) -> None:
        """Call when this rank has resumed after a recovery, with the coordinator's events."""
        start = time.perf_counter()
        self._costs_since_last()  # a replay's logging is recovery time, not the next iteration's
        self._write([RecoveryRecord(
            rank=engine.dist.rank, stage=engine.stage, replica=engine.dist.replica, generation=generation,
            time=time.time(), role=events.role.value, resume=engine.iteration if events.resume is None else events.resume,
            cause=events.cause or None, iteration=events.iteration, inflight_s=events.inflight_s,
            detected_at=events.detected_at, joined_at=events.joined_at, restore_at=events.restore_at,
            state_loaded_at=events.state_loaded_at, logs_received_at=events.logs_received_at,
            ready_at=events.ready_at, resumed_at=events.resumed_at,
            source=None if events.source is None else events.source.value,
            replayed=events.replayed, replay_s=events.replay_s, bytes_sent=events.bytes_sent,
            bytes_received=events.bytes_received, retries=len(events.retries),
        )])
        self._write_s += time.perf_counter() - start

    def close(self) -> None:
        os.close(self._fd)
        if self._board is not None:
            self._board.close()

    def _common(self, engine: "PipelineEngine", now: float) -> dict[str, Any]:
        generation = engine.recovery.generation if engine.recovery is not None else 0
        return {**self._ids, "generation": generation, "time": now}

    def _costs_since_last(self) -> CostSnapshot:
        """What the cost ledger counted (training-thread blocking, bytes) since the previous call."""
        now = LEDGER.snapshot()
        costs, self._costs = now - self._costs, now
        return costs

    def _window_records(self, engine: "PipelineEngine", now: float, tiers: dict[str, int]) -> list[Record]:
        ckpt, records = engine.checkpointer, []
        common = self._common(engine, now)
        schedule = ckpt.schedule()
        if schedule[0] >= 0 and schedule != self._window:
            self._window = schedule
            records.append(WindowRecord(**common, event="started", start=schedule[0], window=schedule[1],
                                        bytes=0, tiers=tiers))
        done = ckpt.last_complete  # set by the capture thread when it publishes
        if done is not None and done.start_iteration != self._completed_start:
            self._completed_start = done.start_iteration
            records.append(WindowRecord(**common, event="completed", start=done.start_iteration,
                                        window=done.window, bytes=done.blob_bytes, tiers=tiers))
        return records

    def _write(self, records: list[Record]) -> None:
        os.write(self._fd, "".join(to_line(r) for r in records).encode())


def open_rank_metrics(engine: "PipelineEngine") -> RankMetrics | None:
    """The engine's metrics writer, or None when ``metrics.dir`` is unset."""
    settings = engine.config.metrics
    if settings.dir is None:
        return None
    return RankMetrics(metrics_path(settings.dir, engine.dist.rank), rank=engine.dist.rank, stage=engine.stage,
                       replica=engine.dist.replica, tensorboard=settings.tensorboard)


class _Board:
    """TensorBoard scalars of every iteration record (``metrics.tensorboard``; needs ``tensorboard``)."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def add_scalars_of(self, record: IterationRecord) -> None:
        for name in ("loss", "grad_norm", "lr_factor", "iteration_ms", "capture_ms", "logging_ms", "log_host_bytes",
                     "window_host_bytes"):
            self._writer.add_scalar(name, getattr(record, name), record.iteration)

    def close(self) -> None:
        self._writer.close()


def _tensorboard(log_dir: Path) -> _Board:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("metrics.tensorboard needs the tensorboard package: pip install 'moetion[tensorboard]' "
                          "or set metrics.tensorboard to false") from None
    return _Board(SummaryWriter(log_dir=str(log_dir)))
