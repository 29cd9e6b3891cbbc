"""Training's step hooks: the sparse checkpointer's window lifecycle around each optimizer step."""
from __future__ import annotations

import torch

from moetion.iteration import StepHooks
from moetion.snapshot.checkpointer import SparseCheckpointer
from moetion.upstream_log import UpstreamLog


class SnapshotHooks(StepHooks):
    """Proposals ride on the data-parallel all-reduce; the previous capture is fenced before the
    step and the next one captured after it; logs older than every stage's restore start are dropped."""

    def __init__(self, checkpointer: SparseCheckpointer, upstream: UpstreamLog | None) -> None:
        self.checkpointer, self.upstream = checkpointer, upstream

    def begin(self, iteration: int) -> None:
        self.checkpointer.begin_iteration(iteration)

    def riders(self, token_counts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return self.checkpointer.dp_payload(token_counts)

    def absorb_riders(self, summed: torch.Tensor) -> None:
        self.checkpointer.absorb_dp(summed)

    def before_step(self) -> None:
        self.checkpointer.before_step()

    def after_step(self, iteration: int) -> None:
        self.checkpointer.after_step(iteration)
        if self.upstream is not None and self.checkpointer.job_restorable_start >= 0:
            # Every stage's restore starts at or after this: older logs are dead.
            self.upstream.drop_before(self.checkpointer.job_restorable_start)
