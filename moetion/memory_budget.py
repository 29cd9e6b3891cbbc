"""Host-memory bounds sized from the machine: the upstream log's default budget, and the largest
single transfer a receiver accepts before it allocates anything.

Both read ``MemAvailable`` once, when a store opens or a transfer header arrives, never per
iteration. A bound is deliberately generous (a share of what is free, not a guess of what the
job needs): it exists so that a forged or corrupted size becomes an error naming the sender, not
a multi-terabyte allocation, and so that logs spill to disk instead of filling the host.
"""
from __future__ import annotations

import os

from moetion.errors import PeerFailure

LOG_MEMORY_FRACTION = 0.25  # of MemAvailable, shared by this host's ranks, for upstream logs in memory
TRANSFER_MEMORY_FRACTION = 0.5  # of MemAvailable: the largest single transfer one receiver accepts
_MEMINFO = "/proc/meminfo"


def available_bytes() -> int:
    """Memory the kernel says can be allocated without swapping (``MemAvailable``)."""
    try:
        with open(_MEMINFO, "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_log_budget(*, local_ranks: int) -> int:
    """In-memory bytes of one rank's upstream log when the config leaves ``budget_bytes`` null."""
    return int(available_bytes() * LOG_MEMORY_FRACTION) // max(1, local_ranks)


def transfer_limit() -> int:
    """The largest transfer a receiver allocates for, given what is free now."""
    return int(available_bytes() * TRANSFER_MEMORY_FRACTION)


def check_wire_size(size: int, *, limit: int, peer: int, what: str) -> int:
    """Returns ``size`` if ``0 <= size <= limit``; else a PeerFailure naming the peer, before any
    allocation: a size read from the wire is the sender's claim, not a fact."""
    if not 0 <= size <= limit:
        raise PeerFailure(
            f"rank {peer} announced {what} of {size} bytes; expected 0..{limit} (this receiver's bound); "
            "a corrupted or forged stream: treating the sender as failed")
    return size
