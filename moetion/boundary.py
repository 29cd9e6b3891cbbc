"""The stage boundary as the iteration body sees it: live links, logs, or both.

Training receives from its neighbours and sends to them, teeing every send into the upstream log.
Replay reads what the neighbours logged instead and records what it computes into its own log.
Inside a chain of lost stages replaying together, a member talks live to the members beside it
and reads the surviving neighbours' logs at the chain's ends. One pair of classes covers all
three: a side with a live neighbour uses the link, a side without one uses the logs.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import torch

from moetion.p2p import StageLinks
from moetion.upstream_log import IterationScalars, LogReader


class Recorder(Protocol):
    """Receives what a stage sent and decided (an :class:`~moetion.upstream_log.UpstreamLog` does)."""

    def log_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None: ...
    def log_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None: ...
    def log_tied_grads(self, iteration: int, key: str, grads: Iterable[torch.Tensor]) -> None: ...
    def log_scalars(self, iteration: int, scalars: IterationScalars) -> None: ...


class BoundaryInputs:
    """The :class:`~moetion.iteration.InputPort`: from a live neighbour where there is one, else from logs."""

    def __init__(self, links: StageLinks | None, logs: LogReader | None = None, *, where: str) -> None:
        self.links, self.logs, self.where = links, logs, where

    def activation(self, iteration: int, micro_batch: int) -> torch.Tensor:
        if self.links is not None and self.links.prev_rank is not None:
            return self.links.recv_activation(what=self._what("activation", iteration, micro_batch))
        return self.logs.activation(iteration, micro_batch)

    def gradient(self, iteration: int, micro_batch: int, like: torch.Tensor) -> torch.Tensor:
        if self.links is not None and self.links.next_rank is not None:
            return self.links.recv_grad(like, what=self._what("gradient", iteration, micro_batch))
        return self.logs.gradient(iteration, micro_batch, like=like)

    def _what(self, kind: str, iteration: int, micro_batch: int) -> str:
        return f"{kind} of micro-batch {micro_batch}, iteration {iteration} ({self.where})"


class BoundaryOutputs:
    """The :class:`~moetion.iteration.OutputPort`: sends to live neighbours, then tees into the log."""

    def __init__(self, links: StageLinks | None, log: Recorder | None, *, where: str) -> None:
        self.links, self.log, self.where = links, log, where

    def send_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        if self.links is not None and self.links.next_rank is not None:
            self.links.send_activation(tensor, what=self._what("activation", iteration, micro_batch))
        if self.log is not None:
            self.log.log_activation(iteration, micro_batch, tensor)

    def send_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        if self.links is not None and self.links.prev_rank is not None:
            self.links.send_grad(tensor, what=self._what("gradient", iteration, micro_batch))
        if self.log is not None:
            self.log.log_gradient(iteration, micro_batch, tensor)

    def wait_sends(self) -> None:
        if self.links is not None:
            self.links.wait_sends()

    def _what(self, kind: str, iteration: int, micro_batch: int) -> str:
        return f"{kind} of micro-batch {micro_batch}, iteration {iteration} ({self.where})"
