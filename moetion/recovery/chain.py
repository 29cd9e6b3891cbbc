"""Chain replay: adjacent stages lost together replay side by side, feeding each other live.

Stage k's replay needs the activations stage k-1 sent it and the gradients stage k+1 sent it. When
k-1 (or k+1) was lost too, those logs died with it, but its own replay computes exactly them, bit
for bit. So the members of a chain replay at once: each sends its output to the next member right
after its forward pass and its input-gradient to the previous member right after its backward
pass; the chain's ends read the surviving neighbours' logs as usual. Per micro-batch the order is
forward down the chain, then backward up it, so no member waits on one that waits on it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from logging_store import LogStore

from moetion.p2p import StageLinks
from moetion.upstream_log import IterationScalars, LogReader, UpstreamLog


class ChainReader(LogReader):
    """A LogReader whose activations (gradients) come live from the previous (next) chain member."""

    def __init__(self, logs: Mapping[int, LogStore], *, stage: int, links: StageLinks) -> None:
        super().__init__(logs, stage=stage)
        self.links = links

    def activation(self, iteration: int, micro_batch: int) -> torch.Tensor:
        if self.links.prev_rank is None:
            return super().activation(iteration, micro_batch)
        return self.links.recv_activation(what=f"replayed activation of micro-batch {micro_batch}, iteration {iteration}")

    def gradient(self, iteration: int, micro_batch: int, like: torch.Tensor | None = None) -> torch.Tensor:
        if self.links.next_rank is None:
            return super().gradient(iteration, micro_batch)
        return self.links.recv_grad(like, what=f"replayed gradient of micro-batch {micro_batch}, iteration {iteration}")


class ChainRecorder:
    """Logs what the member computes (as its UpstreamLog would have) and sends it along the chain."""

    def __init__(self, upstream: UpstreamLog | None, links: StageLinks) -> None:
        self.upstream, self.links = upstream, links

    def log_activation(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        if self.links.next_rank is not None:
            self.links.send_activation(tensor, what=f"replayed activation of micro-batch {micro_batch}, iteration {iteration}")
        if self.upstream is not None:
            self.upstream.log_activation(iteration, micro_batch, tensor)

    def log_gradient(self, iteration: int, micro_batch: int, tensor: torch.Tensor) -> None:
        if self.links.prev_rank is not None:
            self.links.send_grad(tensor, what=f"replayed gradient of micro-batch {micro_batch}, iteration {iteration}")
        if self.upstream is not None:
            self.upstream.log_gradient(iteration, micro_batch, tensor)

    def log_tied_grads(self, iteration: int, key: str, grads: Iterable[torch.Tensor]) -> None:
        if self.upstream is not None:
            self.upstream.log_tied_grads(iteration, key, grads)

    def log_scalars(self, iteration: int, scalars: IterationScalars) -> None:
        self.links.wait_sends()  # once per iteration: the sent tensors may now be freed
        if self.upstream is not None:
            self.upstream.log_scalars(iteration, scalars)
