"""Intra-op thread pinning. Oversubscribed ranks ran 5x slower here, and replay is only bitwise
with the same thread count as the original run, so the count is chosen once and recorded."""
from __future__ import annotations

import os

import torch


def default_threads(local_world_size: int) -> int:
    """Cores divided among the ranks of this host, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def pin_threads(threads: int | None, *, local_world_size: int) -> int:
    """Sets torch's intra-op thread count (``None``: the default) and returns the count used."""
    count = threads if threads is not None else default_threads(local_world_size)
    torch.set_num_threads(count)
    return count
