"""Upstream logging: what a stage sent across its boundaries, and the iteration's global decisions.

Every activation sent to the next stage and every input-gradient sent to the previous one is put
into this stage's :class:`~logging_store.LogStore`, keyed by (iteration, micro-batch, kind, peer
stage), right after the non-blocking send was issued: ``put`` is a copy into pooled memory and
compression runs on a background thread, so the send never waits for it. Per iteration the stage
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
from moetion.errors import MoetionError

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


class UpstreamLog:
    """This stage's log store and the keys it writes."""

    def __init__(self, *, stage: int, store_config: LogStoreConfig | None = None, kept_from: int = 0) -> None:
        self.stage = stage
        self.store = LogStore(store_config or LogStoreConfig())
        # Every iteration from here on is logged completely: what a replaying neighbour may ask for.
        self.kept_from = kept_from

    def log_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        """Call right after sending ``tensor`` to the next stage."""
        self.store.put(LogKey(iteration, micro_batch, ACTIVATION, self.stage + 1), tensor)

    def log_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        """Call right after sending ``tensor`` (the input's gradient) to the previous stage."""
        self.store.put(LogKey(iteration, micro_batch, GRADIENT, self.stage - 1), tensor)

    def log_tied_grads(self, iteration: int, key: str, grads: Iterable[torch.Tensor]) -> None:
        """Call right after a tied weight's gradients were summed across stages (before clipping)."""
        for index, grad in enumerate(grads):
            self.store.put(LogKey(iteration, 0, tied_kind(key, index), self.stage), grad)

    def log_scalars(self, iteration: int, scalars: IterationScalars) -> None:
        """Call at the commit point, once the iteration's global decisions are known."""
        self.store.put(LogKey(iteration, 0, SCALARS, self.stage), scalars.to_tensor())

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
        self.store.close()


class LogReader:
    """Reads what replay needs from the logs of the stages around a replaying stage.

    ``logs`` maps a stage index to that stage's log store (live, or imported from a peer or disk).
    """

    def __init__(self, logs: Mapping[int, LogStore], *, stage: int) -> None:
        self.logs, self.stage = logs, stage

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
                return store.get(log_key)
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
        return store.get(key)
