"""What recovery needs from a stage: the narrow protocol the engine implements.

Recovery never reaches into the engine. It sees a stage through this protocol, as torchft's
Manager sees a trainer only through registered callbacks: where the stage sits, what it holds
(committed iteration, windows, logs), and the few operations that move it (abandon the in-flight
iteration, leave and join the job's group, load state, replay).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from logging_store import LogStoreConfig

from moetion.boundary import Recorder
from moetion.control import ControlPlane
from moetion.data import DataSource
from moetion.iteration import InputPort, OutputPort
from moetion.recovery.records import RecoveryEvents
from moetion.replay import ReplayReport
from moetion.snapshot.image import WindowImage
from moetion.topology import PipeTopology
from moetion.upstream_log import IterationScalars, LogReader


@dataclass(frozen=True)
class Seat:
    """Where a stage sits in the job."""

    rank: int
    stage: int
    replica: int
    topology: PipeTopology
    device: torch.device
    tied_stages: dict[str, list[int]]


@dataclass(frozen=True)
class StageState:
    """A stage's exact state as a live replica hands it over: weights, full optimizer state, the
    logged scalars of the iterations it saw, and its LR scheduler's state (JSON-safe) if it has one."""

    model: dict
    optimizer: dict
    history: dict[int, IterationScalars]
    lr_scheduler: dict | None = None


class RecoverableStage(Protocol):
    """The engine, as recovery sees it."""

    def seat(self) -> Seat: ...

    # -- the committed iteration ---------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """The next iteration this stage runs; every iteration before it is committed."""

    def in_flight_since(self) -> float:
        """Wall-clock time the in-flight iteration started (its work is lost when abandoned)."""

    def loss_history(self) -> dict[int, float]:
        """The loss of every committed iteration this stage knows of."""

    def adopt_losses(self, losses: dict[int, float]) -> None:
        """Takes over losses of iterations committed before this stage's process existed."""

    def abandon_iteration(self) -> None:
        """Forgets the in-flight iteration; weights and optimizer state are untouched."""

    # -- membership ---------------------------------------------------------------------------
    def leave_group(self) -> None: ...
    def join_group(self, control: ControlPlane, generation: int) -> bool:
        """Joins ``generation``'s group; False when a newer generation superseded it first."""

    # -- what the stage holds -------------------------------------------------------------------
    def window_schedule(self) -> tuple[int, int]:
        """(start, W) of the job's window in progress ((-1, 0) without snapshots)."""

    def held_replica(self) -> WindowImage | None:
        """The window replica this stage holds for the replica it receives from."""

    def shm_window(self, start: int | None = None) -> WindowImage | None:
        """This stage's newest intact window in node-local shared memory (``start``: that kept window)."""

    def held_starts(self) -> list[int]:
        """Windows kept for a replay with the stage's replicas, oldest first (-1: the initial state)."""

    def reset_to_initial(self) -> None:
        """A survivor about to replay with its stage from the initial state goes back to it."""

    def own_window_start(self) -> int | None:
        """A survivor's newest complete window (the start a replay with its stage's replicas can use)."""

    def persist_root(self) -> Path | None: ...

    def logs_kept_from(self) -> int | None:
        """Every iteration from here on is in this stage's upstream log (None: not logging)."""

    def export_logs(self, start: int, stop: int) -> bytes: ...

    def received_log_config(self) -> LogStoreConfig | None:
        """How logs received from neighbours are held: under this stage's own host-memory budget."""

    def recorder(self) -> Recorder | None:
        """Where a replay records what the stage sends and decides (its upstream log)."""

    def state(self) -> StageState: ...

    def reoffer_window(self, restoring: list[int]) -> None:
        """Sends this stage's newest window again to its replication peer if that peer is restoring."""

    # -- restoring ----------------------------------------------------------------------------
    def load_state(self, state: StageState, *, resume: int) -> None:
        """Takes over a live replica's exact state; training continues at ``resume``."""

    def replay(self, window: WindowImage | None, logs: LogReader, data: DataSource, *, resume: int,
               inputs: InputPort | None = None, outputs: OutputPort | None = None, together: bool = False,
               survivor: bool = False) -> ReplayReport | None:
        """Replays from ``window`` (None: the initial state) to just before ``resume``, recording what
        it sends and decides into its own log; training continues at ``resume``. ``together``: with
        every replica of the stage (the data-parallel and expert-parallel groups live); ``survivor``:
        this rank's log already holds what it replays, so nothing is recorded."""

    def adopt_schedule(self, *, start: int, window: int, resume: int, restored_start: int) -> None: ...

    def recovered(self, generation: int, events: RecoveryEvents) -> None:
        """This rank resumed after a recovery in ``generation`` (its metrics record it)."""
