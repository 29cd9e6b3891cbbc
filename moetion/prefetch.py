"""Reading and collating off the training thread, ahead of the stage, with a bounded depth.

A data source here is addressable, so what a stage will ask for next is known: replica ``r`` reads
``(t, r*M) .. (t, r*M + M - 1)`` and then iteration ``t + 1``. :class:`PrefetchingSource` keeps the
next ``depth`` of those in flight on background threads and hands each over when the iteration body
asks; the tensors are those the wrapped source returns, so prefetching changes timing, never bits.
A request it did not foresee (a re-run after a recovery, a replay) is read on the spot.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from moetion.data import Batch, DataSource
from moetion.errors import DataError

Key = tuple[int, int]  # (iteration, global micro-batch index)


class PrefetchingSource:
    """``source`` read up to ``depth`` micro-batches ahead by ``workers`` threads.

    ``micro_batches`` is the stage's micro-batches per iteration (``config.micro_batches``).
    ``seconds_waited`` is the time the training thread spent blocked on data, over ``requests``.
    """

    def __init__(self, source: DataSource, *, micro_batches: int, depth: int = 4, workers: int = 1) -> None:
        if micro_batches < 1 or depth < 1 or workers < 1:
            raise DataError(f"micro_batches, depth and workers must be >= 1, got {micro_batches}, {depth}, {workers}")
        self.source, self.micro_batches, self.depth = source, micro_batches, depth
        self.seconds_waited = 0.0
        self.requests = 0
        self._pending: dict[Key, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moetion-prefetch")

    def micro_batch(self, iteration: int, index: int) -> Batch:
        start = time.perf_counter()
        key = (iteration, index)
        with self._lock:
            future = self._pending.pop(key, None)
            self._schedule_after(key)
        batch = future.result() if future is not None else self.source.micro_batch(iteration, index)
        self.seconds_waited += time.perf_counter() - start
        self.requests += 1
        return batch

    @property
    def queued(self) -> list[Key]:
        """The micro-batches being read ahead, at most ``depth``."""
        with self._lock:
            return list(self._pending)

    def close(self) -> None:
        """Drops what is queued and stops the threads."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=True)

    def _schedule_after(self, key: Key) -> None:
        upcoming, nxt = [], key
        for _ in range(self.depth):
            nxt = self._successor(nxt)
            upcoming.append(nxt)
        for stale in set(self._pending) - set(upcoming):  # the stage jumped (a re-run or a replay)
            self._pending.pop(stale).cancel()
        for k in upcoming:
            if k not in self._pending:
                self._pending[k] = self._pool.submit(self.source.micro_batch, *k)

    def _successor(self, key: Key) -> Key:
        iteration, index = key
        if (index + 1) % self.micro_batches:
            return iteration, index + 1
        return iteration + 1, index + 1 - self.micro_batches
