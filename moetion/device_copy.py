"""Copies from a stage's device into host memory: the one place that knows CPU from CUDA.

On the CPU a copy is a plain copy and there is nothing to order: the capture thread copies straight
into the snapshot file, and a logged boundary tensor goes straight into the log store.

On CUDA the device-to-host copies run on a dedicated side stream, never on the training stream:

- the training thread records an event on its stream right after the optimizer step
  (:meth:`CaptureCopier.mark_step`); the side stream waits for it, so the copies read the
  parameters that step wrote, while the next iteration's forward and backward run;
- they land in pinned host buffers recycled from a :class:`BufferPool` (sized from the window's
  largest capture, so steady state allocates nothing); the capture thread waits for their
  completion event, then copies on into the snapshot file and computes checksums on the host;
- the training thread never waits for the host side: before the next optimizer step
  (:meth:`CaptureCopier.order_step_after_copies`) its stream waits, on the GPU, for the copies'
  completion event, the only fence the next step's parameter writes need.

Boundary tensors for the upstream log go the same way (:class:`HostStaging`): a copy into a pinned
buffer on the side stream at ``put``, handed to the log store (compression stays on the host) once
it completed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from moetion.errors import MoetionError

_ALIGN = 1 << 12  # pool buffers are rounded up to whole pages, so slightly larger captures reuse them


class BufferPool:
    """Recycled host buffers of uint8; pinned (page-locked) for CUDA copies, plain otherwise.

    ``lease`` hands out a free buffer at least as large as asked (a new one only when none is);
    ``reserve`` drops free buffers too small for the coming captures and allocates one that fits,
    so the allocation happens when a window is planned rather than in its captures.
    """

    def __init__(self, *, pinned: bool) -> None:
        self.pinned = pinned
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocations = 0  # buffers ever allocated: steady state adds none

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            self._free = [b for b in self._free if b.numel() >= nbytes]
            if not self._free and nbytes > 0:
                self._free.append(self._allocate(nbytes))

    def lease(self, nbytes: int) -> torch.Tensor:
        """A whole buffer of at least ``nbytes`` bytes; give it back with :meth:`release`."""
        with self._lock:
            fitting = [b for b in self._free if b.numel() >= nbytes]
            if fitting:
                buffer = min(fitting, key=torch.Tensor.numel)
                self._free = [b for b in self._free if b is not buffer]
                return buffer
            return self._allocate(nbytes)

    def release(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's elements as a flat uint8 view (a copy only when it is not contiguous)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


class CaptureCopier:
    """How the capture thread copies source tensors into host destinations, and how training is fenced.

    The CPU version: one ``_foreach_copy_`` straight into the destinations, done when ``enqueued``
    is called, so the fence before the next step waits for the copies themselves.
    """

    def mark_step(self) -> object | None:
        """On the training thread, right after the optimizer step: what the copies must follow."""
        return None

    def reserve(self, nbytes: int) -> None:
        """The largest capture of the window being planned has ``nbytes`` bytes."""

    def copy(self, destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], *, after: object | None,
             enqueued: Callable[[], None]) -> None:
        """Copies ``sources``' bytes into ``destinations`` (flat uint8) on the capture thread; calls
        ``enqueued`` once the sources may be overwritten by the next step as far as it is concerned."""
        if destinations:
            # One call for the whole capture: it gives up the GIL once, where a copy_ per tensor
            # would take it back hundreds of times from the training thread (docs/gpu.md).
            torch._foreach_copy_(list(destinations), [flat_bytes(s) for s in sources])
        enqueued()

    def order_step_after_copies(self) -> None:
        """On the training thread before the next optimizer step, once every copy was enqueued."""


class CudaCaptureCopier(CaptureCopier):
    """Side-stream copies into pinned staging buffers (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = BufferPool(pinned=True)
        self._last_done: torch.cuda.Event | None = None

    def mark_step(self) -> object | None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def reserve(self, nbytes: int) -> None:
        self.pool.reserve(nbytes)

    def copy(self, destinations, sources, *, after, enqueued) -> None:
        offsets, total = [], 0
        for destination in destinations:
            offsets.append(total)
            total += destination.numel()
        staging = self.pool.lease(total)
        try:
            staged = [staging[o : o + d.numel()] for o, d in zip(offsets, destinations)]
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                self.stream.wait_event(after)
                if staged:  # flattened here: a non-contiguous source's copy must follow the step too
                    torch._foreach_copy_(staged, [flat_bytes(s) for s in sources], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
            self._last_done = done
            enqueued()
            done.synchronize()  # the capture thread waits here, never the training thread
            if destinations:
                torch._foreach_copy_(list(destinations), staged)
        finally:
            self.pool.release(staging)

    def order_step_after_copies(self) -> None:
        if self._last_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_done)


def capture_copier(device: torch.device) -> CaptureCopier:
    """The copier for snapshot sources living on ``device``."""
    if device.type == "cpu":
        return CaptureCopier()
    if device.type == "cuda":
        return CudaCaptureCopier(device)
    raise MoetionError(f"snapshots copy from cpu or cuda devices; this stage's parameters are on {device}")


@dataclass
class StagedCopy:
    """A device tensor on its way to host memory: ``host`` is valid once :meth:`done`."""

    host: torch.Tensor
    source: torch.Tensor | None  # held so the caching allocator cannot reuse it before the copy ran
    event: object | None
    buffer: torch.Tensor | None
    pool: BufferPool | None

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def release(self) -> None:
        """Gives the pinned buffer back; ``host`` must not be read afterwards."""
        self.source = None
        if self.pool is not None:
            self.pool.release(self.buffer)
            self.buffer = self.pool = None


class HostStaging:
    """Device tensors to host copies without waiting at the call: for the upstream log's ``put``."""

    def __init__(self) -> None:
        self.pool = BufferPool(pinned=True)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def start(self, tensor: torch.Tensor) -> StagedCopy:
        """Starts copying ``tensor`` (on any device) to the host; a CPU tensor is returned as is."""
        if tensor.is_cpu:
            return StagedCopy(tensor, None, None, None, None)
        device = tensor.device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self.pool.lease(nbytes)
        host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        produced = torch.cuda.current_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_stream(produced)
            host.copy_(tensor.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return StagedCopy(host, tensor, event, buffer, self.pool)
