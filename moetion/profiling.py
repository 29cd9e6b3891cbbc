"""Always-on accounting of what moetion costs a training process.

Wall-clock ratios between runs are noise on a shared machine; what moetion itself costs can be
counted directly. Three kinds of figures, all cumulative since the process started (a caller
takes a :meth:`CostLedger.snapshot` before and after a span and subtracts):

- **blocked**: seconds the training thread spent inside moetion's blocking points (the capture
  fence, capture submission, Algorithm 1, putting a boundary tensor into the log), timed with two
  ``perf_counter`` calls each, per category; and the training thread's CPU-seconds spent there
  (``thread_time``): on a saturated machine the wall figure includes time the thread was
  preempted, the CPU figure does not;
- **bytes**: bytes copied by the capture thread, stored in shared memory per window, sent to the
  replication peer, put into the upstream log;
- **background CPU**: CPU-seconds of moetion's own threads (named ``moetion-*`` and the log
  store's ``logging_store-*``), read from each live thread's CPU clock.

Each counter is written under one lock; the cost is a lock and a float add per blocking point.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

BACKGROUND_THREAD_PREFIXES = ("moetion-", "logging_store-")

# Blocking categories (training thread) and byte categories, one name each.
FENCE = "fence"  # waiting for the previous capture before the optimizer step
CAPTURE = "capture"  # planning a window's layout, mapping its file, submitting the copies
PROPOSE = "propose"  # Algorithm 1 at a decision iteration
LOG_PUT = "log_put"  # copying a boundary tensor into the upstream log
COPIED = "copied"  # bytes the capture thread copied into window files
STORED = "stored"  # bytes of each published window (shared memory)
REPLICATED = "replicated"  # bytes sent to the replication peer
LOGGED = "logged"  # raw bytes put into the upstream log


@dataclass(frozen=True)
class CostSnapshot:
    """Cumulative figures at one instant; subtract two to get a span's costs."""

    blocked_s: dict[str, float] = field(default_factory=dict)
    blocked_cpu_s: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    background_cpu_s: float = 0.0

    def __sub__(self, earlier: "CostSnapshot") -> "CostSnapshot":
        return CostSnapshot(
            blocked_s={k: v - earlier.blocked_s.get(k, 0.0) for k, v in self.blocked_s.items()},
            blocked_cpu_s={k: v - earlier.blocked_cpu_s.get(k, 0.0) for k, v in self.blocked_cpu_s.items()},
            bytes={k: v - earlier.bytes.get(k, 0) for k, v in self.bytes.items()},
            background_cpu_s=self.background_cpu_s - earlier.background_cpu_s,
        )

    @property
    def blocked_total_s(self) -> float:
        return sum(self.blocked_s.values())


class CostLedger:
    """The process-wide counters (one per process: each stage replica is its own process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocked: dict[str, float] = {}
        self._blocked_cpu: dict[str, float] = {}
        self._bytes: dict[str, int] = {}

    @contextmanager
    def blocking(self, category: str) -> Iterator[None]:
        """Times the enclosed code as training-thread time blocked in ``category``."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add_blocked(category, time.perf_counter() - start, cpu_seconds=time.thread_time() - cpu)

    def add_blocked(self, category: str, seconds: float, *, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            self._blocked[category] = self._blocked.get(category, 0.0) + seconds
            self._blocked_cpu[category] = self._blocked_cpu.get(category, 0.0) + cpu_seconds

    def add_bytes(self, category: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[category] = self._bytes.get(category, 0) + nbytes

    def snapshot(self) -> CostSnapshot:
        with self._lock:
            blocked, blocked_cpu, nbytes = dict(self._blocked), dict(self._blocked_cpu), dict(self._bytes)
        return CostSnapshot(blocked, blocked_cpu, nbytes, background_cpu_seconds())


def background_cpu_seconds(prefixes: tuple[str, ...] = BACKGROUND_THREAD_PREFIXES) -> float:
    """CPU-seconds used so far by the live threads of this process whose names start with ``prefixes``.

    Read before the threads stop (``engine.close()``): a finished thread's clock is gone.
    """
    return sum(thread_cpu_seconds(t) for t in threading.enumerate() if t.name.startswith(prefixes))


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """CPU-seconds ``thread`` used so far; 0 once it ended (its clock is gone) or before it started."""
    if thread.ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, ProcessLookupError):
        return 0.0  # it ended between the check and the read


LEDGER = CostLedger()
# A rank forked while another thread of its parent held the lock would inherit it held forever.
os.register_at_fork(after_in_child=lambda: setattr(LEDGER, "_lock", threading.Lock()))
