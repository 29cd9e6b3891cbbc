"""Host copies of device tensors: the recycled staging pool, the capture worker's two fences, and the
upstream log's staging, on the CPU (fast, one process). tests/moetion/test_gpu.py runs the CUDA side."""
import threading

import pytest
import torch

from logging_store import LogKey
from moetion.device_copy import BufferPool, CaptureCopier, HostStaging, capture_copier
from moetion.errors import MoetionError
from moetion.snapshot.capture import CaptureWorker
from moetion.upstream_log import UpstreamLog


def test_pool_recycles_buffers_and_allocates_only_when_none_fits():
    pool = BufferPool(pinned=False)
    pool.reserve(10_000)
    assert pool.allocations == 1
    first = pool.lease(9_000)
    assert first.numel() >= 10_000 and first.dtype == torch.uint8
    pool.release(first)
    again = pool.lease(10_000)
    assert again is first and pool.allocations == 1  # steady state: the same buffer, no allocation
    other = pool.lease(100)  # the only buffer is leased: a second one
    assert other is not first and pool.allocations == 2
    pool.release(other)
    pool.release(first)
    assert pool.lease(100) is other  # the smallest buffer that fits
    pool.release(other)


def test_pool_reserve_drops_buffers_too_small_for_the_next_window():
    pool = BufferPool(pinned=False)
    small = pool.lease(4096)
    pool.release(small)
    pool.reserve(1 << 20)
    assert pool.free_bytes() >= 1 << 20
    large = pool.lease(1 << 20)
    assert large is not small
    pool.release(large)
    pool.reserve(10)  # a smaller window keeps the large buffer rather than allocating again
    assert pool.allocations == 2


def test_cpu_copier_copies_bytes_exactly():
    sources = [torch.randn(5, 3), torch.arange(7, dtype=torch.int64), torch.randn(4).to(torch.bfloat16)]
    blob = torch.zeros(4096, dtype=torch.uint8)
    destinations, offset = [], 0
    for s in sources:
        n = s.numel() * s.element_size()
        destinations.append(blob[offset : offset + n])
        offset += -(-n // 64) * 64
    worker = CaptureWorker(copier=capture_copier(torch.device("cpu")))
    worker.submit(list(zip(sources, destinations)))
    worker.fence_step()
    worker.close()
    for s, d in zip(sources, destinations):
        assert torch.equal(d.view(s.dtype).view(s.shape), s)


def test_cpu_fence_waits_for_the_copies_but_not_for_the_publishing_after_them():
    """A window's checksums and publishing read only the snapshot's buffers: the next optimizer step
    need not wait for them, only for the copies of its sources."""
    publishing, published = threading.Event(), threading.Event()

    def publish():
        publishing.set()
        assert published.wait(10)

    worker = CaptureWorker(copier=capture_copier(torch.device("cpu")))
    source, destination = torch.arange(4, dtype=torch.float32), torch.zeros(16, dtype=torch.uint8)
    worker.submit([(source, destination)], then=publish)
    worker.fence_step()  # returns although publish() still waits
    assert torch.equal(destination.view(torch.float32), source)
    assert publishing.wait(10) and not published.is_set()
    published.set()
    worker.fence()
    worker.close()


def test_capture_copier_refuses_other_devices():
    with pytest.raises(MoetionError, match="cpu or cuda"):
        capture_copier(torch.device("meta"))


class _AsyncCopier(CaptureCopier):
    """Enqueues at once, then holds the host side of the copy until released: a side stream's shape."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ordered = 0

    def copy(self, destinations, sources, *, after, enqueued):
        enqueued()
        assert self.release.wait(10)
        super().copy(destinations, sources, after=after, enqueued=lambda: None)

    def order_step_after_copies(self):
        self.ordered += 1


def test_asynchronous_fence_waits_for_enqueueing_only_and_full_fence_for_everything():
    copier = _AsyncCopier()
    worker = CaptureWorker(copier=copier)
    source, destination = torch.ones(4), torch.zeros(16, dtype=torch.uint8)
    worker.submit([(source, destination)])
    worker.fence_step()  # returns while the host side still waits: training is not blocked by it
    assert copier.ordered == 1 and not destination.any()
    copier.release.set()
    worker.fence()
    assert torch.equal(destination.view(torch.float32), source)
    worker.close()


def test_asynchronous_fence_reports_a_job_that_failed_before_enqueueing():
    worker = CaptureWorker(copier=_AsyncCopier())

    def broken():
        raise ValueError("layout planning failed")
        yield  # a generator, like the checkpointer's lazy copy jobs

    worker.submit(broken())
    with pytest.raises(RuntimeError, match="layout planning failed"):
        worker.fence_step()
    worker.close()


def test_host_staging_returns_cpu_tensors_as_they_are():
    t = torch.randn(3)
    staged = HostStaging().start(t)
    assert staged.done() and staged.host is t
    staged.release()


def test_upstream_log_of_cpu_tensors_is_unchanged():
    log = UpstreamLog(stage=1)
    t = torch.randn(2, 3)
    log.log_activation(0, 0, t)
    assert torch.equal(log.store.get(LogKey(0, 0, "activation", 2)), t)
    log.close()
