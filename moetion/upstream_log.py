"""Upstream logging: what a stage sent across its boundaries, and the iteration's global decisions.

Every activation sent to the next stage and every input-gradient sent to the previous one is put
into this stage's :class:`~logging_store.LogStore`, keyed by (iteration, micro-batch, kind, peer
stage), right after the non-blocking send was issued: ``put`` is a copy into pooled memory and
compression runs on a background thread, so the send never waits for it. A tensor on a GPU is
first copied into pinned host memory on a side stream (:class:`~moetion.device_copy.HostStaging`)
and handed to the store once that copy completed, at the latest at the iteration's commit point. Per iteration the stage
also logs what was decided globally (learning-rate factor, grad-norm, clip coefficient) and the
reduced gradient of every tied weight, because a replaying stage must reuse these decisions, never
recompute them from its partial view.

Logs are kept from the job-wide restorable start onward: the oldest window start any stage could
restore from (its newest window in shared memory, or on disk when persisting), so that every
stage's restore finds its neighbours' logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from logging_store import LogKey, LogStore, LogStoreConfig
from moetion.config import UpstreamLogConfig
from moetion.device_copy import HostStaging, StagedCopy
from moetion.errors import MoetionError
from moetion.memory_budget import default_log_budget
from moetion.profiling import LEDGER, LOG_PUT, LOGGED

ACTIVATION = "activation"
GRADIENT = "gradient"
SCALARS = "scalars"


def tied_kind(key: str, index: int) -> str:
    return f"tied.{key}.{index}"


@dataclass(frozen=True)
class IterationScalars:
    """The global decisions of one iteration, as every stage applied them, and its loss (so that a
    restored stage knows the losses of the iterations it replayed)."""

    lr_factor: float
    grad_norm: float
    clip_coef: float
    loss: float = float("nan")

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.lr_factor, self.grad_norm, self.clip_coef, self.loss], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "IterationScalars":
        return cls(*values.tolist())


def store_config(settings: UpstreamLogConfig, *, local_ranks: int) -> LogStoreConfig:
    """The log store of a rank sharing its host with ``local_ranks - 1`` others: with
    ``budget_bytes`` null, its in-memory share of the host is sized from the machine now, and the
    oldest entries beyond it spill to a private directory (never dropped)."""
    budget = settings.budget_bytes if settings.budget_bytes is not None else default_log_budget(local_ranks=local_ranks)
    return LogStoreConfig(codec=settings.codec, level=settings.level, shuffle=settings.shuffle,
                          budget_bytes=budget, spill_dir=settings.spill_dir)


class UpstreamLog:
    """This stage's log store and the keys it writes."""

    def __init__(self, *, stage: int, store_config: LogStoreConfig | None = None, kept_from: int = 0) -> None:
        self.stage = stage
        self._store = LogStore(store_config or LogStoreConfig())
        self._staging: HostStaging | None = None  # made on the first device tensor
        self._in_flight: list[tuple[LogKey, StagedCopy]] = []  # device copies not in the store yet
        # Every iteration from here on is logged completely: what a replaying neighbour may ask for.
        self.kept_from = kept_from

    def log_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        """Call right after sending ``tensor`` to the next stage."""
        self._put(LogKey(iteration, micro_batch, ACTIVATION, self.stage + 1), tensor)

    def log_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        """Call right after sending ``tensor`` (the input's gradient) to the previous stage."""
        self._put(LogKey(iteration, micro_batch, GRADIENT, self.stage - 1), tensor)

    def log_tied_grads(self, iteration: int, key: str, grads: Iterable[torch.Tensor]) -> None:
        """Call right after a tied weight's gradients were summed across stages (before clipping)."""
        for index, grad in enumerate(grads):
            self._put(LogKey(iteration, 0, tied_kind(key, index), self.stage), grad)

    def log_scalars(self, iteration: int, scalars: IterationScalars) -> None:
        """Call at the commit point, once the iteration's global decisions are known: the
        iteration's device copies are complete in the store from here on."""
        self._put(LogKey(iteration, 0, SCALARS, self.stage), scalars.to_tensor())
        self.flush()

    @property
    def store(self):
        """The log store, with every entry put so far (waits for device copies still in flight)."""
        self.flush()
        return self._store

    def flush(self) -> None:
        """Moves every device copy into the store, waiting for those not complete yet."""
        self._move_completed(wait=True)

    def _put(self, key: LogKey, tensor: torch.Tensor) -> None:
        """Puts on the training thread: the copy into pooled memory is time it is blocked (for a
        device tensor, only the start of its copy to pinned memory)."""
        with LEDGER.blocking(LOG_PUT):
            if tensor.is_cpu:
                self._store.put(key, tensor)
            else:
                self._staging = self._staging or HostStaging()
                self._in_flight.append((key, self._staging.start(tensor)))
                self._move_completed(wait=False)
        LEDGER.add_bytes(LOGGED, tensor.numel() * tensor.element_size())

    def _move_completed(self, *, wait: bool) -> None:
        """Puts the completed device copies into the store, oldest first (all of them if ``wait``)."""
        while self._in_flight:
            key, copy = self._in_flight[0]
            if not wait and not copy.done():
                return
            copy.wait()
            try:
                self._store.put(key, copy.host)
            finally:
                copy.release()
                self._in_flight.pop(0)

    def drop_before(self, iteration: int) -> None:
        if iteration > self.kept_from:
            self.store.drop_before(iteration)
            self.kept_from = iteration

    def drop_from(self, iteration: int) -> None:
        """Forgets an abandoned iteration's partial logs, so that its retry logs them afresh."""
        self.store.drop_from(iteration)

    def bytes_per_iteration(self) -> tuple[float, float]:
        """(raw, stored) bytes logged per iteration, averaged over the iterations held now."""
        stats = self.store.stats()
        iterations = len({key.iteration for key in self.store.keys()}) or 1
        return stats.raw_bytes / iterations, stats.stored_bytes / iterations

    def export(self, start: int, stop: int) -> bytes:
        return self.store.export(start, stop)

    def close(self) -> None:
        for _, copy in self._in_flight:
            copy.wait()
            copy.release()
        self._in_flight.clear()
        self._store.close()


class LogReader:
    """Reads what replay needs from the logs of the stages around a replaying stage.

    ``logs`` maps a stage index to that stage's log store (live, or imported from a peer or disk);
    tensors are returned on ``device``, the replaying stage's (logs are kept on the host).
    """

    def __init__(self, logs: Mapping[int, LogStore], *, stage: int, device: torch.device | str = "cpu") -> None:
        self.logs, self.stage, self.device = logs, stage, torch.device(device)

    def activation(self, iteration: int, micro_batch: int) -> torch.Tensor:
        return self._get(self.stage - 1, LogKey(iteration, micro_batch, ACTIVATION, self.stage))

    def gradient(self, iteration: int, micro_batch: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient of the stage's output (``like``: that output, for readers that need its shape)."""
        return self._get(self.stage + 1, LogKey(iteration, micro_batch, GRADIENT, self.stage))

    def scalars(self, iteration: int) -> IterationScalars:
        """From any stage's log: every stage logged the same global decisions."""
        for source, store in sorted(self.logs.items()):
            key = LogKey(iteration, 0, SCALARS, source)
            if key in store:
                return IterationScalars.from_tensor(store.get(key))
        raise MoetionError(f"no log holds the scalars of iteration {iteration}; logs of stages {sorted(self.logs)} were given")

    def tied_grad(self, iteration: int, key: str, index: int) -> torch.Tensor:
        """The reduced gradient of a tied weight, from another stage that holds a copy."""
        for source, store in sorted(self.logs.items()):
            log_key = LogKey(iteration, 0, tied_kind(key, index), source)
            if source != self.stage and log_key in store:
                return store.get(log_key).to(self.device)
        raise MoetionError(
            f"no log of another stage holds the reduced gradient of tied weight {key!r} at iteration "
            f"{iteration}; pass the log of a stage that shares it"
        )

    def _get(self, source: int, key: LogKey) -> torch.Tensor:
        store = self.logs.get(source)
        if store is None:
            raise MoetionError(f"replaying stage {self.stage} needs the log of stage {source}, which was not given")
        if key not in store:
            raise MoetionError(f"the log of stage {source} has no entry {key}; was it dropped or never logged?")
        return store.get(key).to(self.device)
