"""Copying snapshot tensors off the critical path.

The worker thread copies while the next iteration's forward and backward run (torch's copy
releases the GIL). The engine calls :meth:`CaptureWorker.fence_step` before the next optimizer
step, so no tensor is overwritten while it is still being copied: on the CPU that waits for the
copies themselves; on CUDA only until they were enqueued on the side stream, which the training
stream then waits for on the GPU (:mod:`moetion.device_copy`). Neither waits for the work after
the copies (a window's checksums and publishing), which reads only the snapshot's own buffers.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable

import torch

from moetion.device_copy import CaptureCopier
from moetion.profiling import COPIED, LEDGER, thread_cpu_seconds
from moetion.window import BackgroundWork

CopyJob = tuple[torch.Tensor, torch.Tensor]  # (source tensor, destination uint8 view)


class CaptureWorker:
    """One background thread running capture jobs in submission order."""

    def __init__(self, name: str = "moetion-capture", *, copier: CaptureCopier | None = None) -> None:
        self.copier = copier or CaptureCopier()
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._pending = 0
        self._unenqueued = 0  # jobs whose copies were not enqueued yet (on the CPU: not done yet)
        self._done = threading.Condition()
        self.bytes_copied = 0
        self.seconds_copying = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def bandwidth(self) -> float | None:
        """Measured capture throughput in bytes per second (copies plus the work after them)."""
        return self.bytes_copied / self.seconds_copying if self.seconds_copying > 0 else None

    def work(self) -> BackgroundWork:
        """This thread's CPU-seconds and bytes copied so far (an input of the snapshot budget)."""
        return BackgroundWork(thread_cpu_seconds(self._thread), self.bytes_copied)

    def submit(self, copies: Iterable[CopyJob], then: Callable[[], None] | None = None) -> None:
        """Queues ``copies`` (iterated on the worker thread); ``then`` runs there after the last one."""
        self._raise_pending()
        after = self.copier.mark_step()  # on the training thread: the copies follow this step
        with self._done:
            self._pending += 1
            self._unenqueued += 1
        self._jobs.put((copies, then, after))

    def fence_step(self) -> None:
        """Call before an optimizer step: returns once that step may overwrite the captured sources."""
        with self._done:
            self._done.wait_for(lambda: self._unenqueued == 0)
        self.copier.order_step_after_copies()
        self._raise_pending()

    def fence(self) -> None:
        """Blocks until every submitted job finished; re-raises a job's error."""
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        self._raise_pending()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"snapshot capture failed: {error}") from error

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            copies, then, after = job
            enqueued = False

            def mark_enqueued() -> None:
                nonlocal enqueued
                enqueued = True
                with self._done:
                    self._unenqueued -= 1
                    self._done.notify_all()

            try:
                start = time.perf_counter()
                destinations, sources = [], []
                for source, destination in copies:
                    destinations.append(destination)
                    sources.append(source)
                self.copier.copy(destinations, sources, after=after, enqueued=mark_enqueued)
                copied = sum(d.numel() for d in destinations)
                self.bytes_copied += copied
                LEDGER.add_bytes(COPIED, copied)
                if then is not None:
                    then()
                # End to end (copies, checksums, publishing): the throughput the budget can count on.
                self.seconds_copying += time.perf_counter() - start
            except BaseException as error:  # noqa: BLE001 - surfaced to the training thread at the fence
                self._error = error
            with self._done:
                self._pending -= 1
                if not enqueued:  # failed before its copies were enqueued: nothing left to fence
                    self._unenqueued -= 1
                self._done.notify_all()
