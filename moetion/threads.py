"""Intra-op thread pinning. Oversubscribed ranks ran 5x slower here, and replay is only bitwise
with the same thread count as the original run, so the count is chosen once and recorded."""
from __future__ import annotations

import os

import torch


def default_threads(local_world_size: int) -> int:
    """Cores divided among the ranks of this host, at least one, leaving one core free when the
    ranks' intra-op teams would otherwise fill every core.

    moetion's own threads (capture, replication, log compression, prefetch) wake every iteration; on
    a full host each wake-up preempts a thread of an OpenMP team, and the whole team then waits for
    it at its next barrier. Measured on 2 cores, 1 rank, snapshots at W=8: 2 threads 573 ms per
    iteration, 1 thread 368 ms (without snapshots: 312 and 356 ms). The rule does not depend on
    whether snapshots are on, so turning them off never changes the arithmetic of a run.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = max(1, local_world_size)
    threads = max(1, cores // ranks)
    if threads > 1 and threads * ranks == cores:
        threads = max(1, (cores - 1) // ranks)
    return threads


def pin_threads(threads: int | None, *, local_world_size: int) -> int:
    """Sets torch's intra-op thread count (``None``: the default) and returns the count used."""
    count = threads if threads is not None else default_threads(local_world_size)
    torch.set_num_threads(count)
    return count
