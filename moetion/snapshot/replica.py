"""The peer tier: every complete window is copied to another host's memory, for node loss.

Each stage replica sends its windows to one peer rank (the next stage of its pipeline, or the
next replica when the pipeline has one stage) over a gloo group of its own, never the
pipeline's, from a background thread. The receiver keeps its last complete replica until the next
has fully arrived *and* passed its checksums, so there is never a moment without one.

Wire protocol per window: an int64 header ``[MAGIC, manifest_bytes, blob_bytes]``, the manifest
JSON, the blob. A header with ``manifest_bytes == -1`` closes the stream.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
import torch.distributed as dist

from moetion import failure_notice
from moetion.errors import PeerFailure
from moetion.faults import fault_point
from moetion.memory_budget import check_wire_size, transfer_limit
from moetion.profiling import LEDGER, REPLICATED, thread_cpu_seconds
from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest
from moetion.topology import PipeTopology
from moetion.window import BackgroundWork

log = logging.getLogger(__name__)

MAGIC = 0x4D4F4557  # "MOEW"
MAX_MANIFEST_BYTES = 64 << 20
_CLOSE = -1


def replication_peers(topology: PipeTopology, rank: int) -> tuple[int, int] | None:
    """(send_to, receive_from) ranks: the next/previous stage, or replica when there is one stage."""
    stage, replica = topology.stage_of(rank), topology.replica_of(rank)
    if topology.num_stages > 1:
        n = topology.num_stages
        return (topology.rank(stage=(stage + 1) % n, replica=replica),
                topology.rank(stage=(stage - 1) % n, replica=replica))
    if topology.data_parallel > 1:
        n = topology.data_parallel
        return (topology.rank(stage=stage, replica=(replica + 1) % n),
                topology.rank(stage=stage, replica=(replica - 1) % n))
    return None


class PeerReplicator:
    """Sends this stage's windows to ``send_to`` and holds what ``receive_from`` sends."""

    def __init__(self, *, group: dist.ProcessGroup, send_to: int, receive_from: int, stage: int, replica: int) -> None:
        self.group = group
        self.send_to, self.receive_from = send_to, receive_from
        self.stage, self.replica = stage, replica
        self._held: WindowImage | None = None
        self._pending: WindowImage | None = None
        self._sending: WindowImage | None = None
        self._closing = False
        self._abandoned = False
        self._wake = threading.Condition()
        self.error: str | None = None
        self.windows_sent = 0
        self.bytes_sent = self.bytes_received = 0
        self._sender = threading.Thread(target=self._send_loop, name="moetion-replica-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="moetion-replica-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    def offer(self, image: WindowImage) -> None:
        """Queues a complete window for the peer; a newer one supersedes one not yet sent."""
        with self._wake:
            self._pending = image
            self._wake.notify()

    def work(self) -> list[BackgroundWork]:
        """The sending and the receiving thread's CPU-seconds and bytes so far (inputs of the
        snapshot budget: in a ring of equal stages each receives about what it sends)."""
        return [BackgroundWork(thread_cpu_seconds(self._sender), self.bytes_sent),
                BackgroundWork(thread_cpu_seconds(self._receiver), self.bytes_received)]

    def reads(self, blob: torch.Tensor) -> bool:
        """Whether ``blob`` is the blob of a window waiting to be sent or being sent."""
        with self._wake:
            return any(image is not None and image.blob.data_ptr() == blob.data_ptr()
                       for image in (self._pending, self._sending))

    def held(self) -> WindowImage | None:
        """The last complete, verified window received from ``receive_from``."""
        return self._held

    def adopt_held(self, image: WindowImage | None) -> None:
        """Takes over the replica a previous replicator (of an older process group) held."""
        if self._held is None:
            self._held = image

    def abandon(self) -> None:
        """The group is being torn down: stop without the close handshake. Threads blocked in the
        group fail when it closes and exit (they keep only a message, no live exception)."""
        with self._wake:
            self._abandoned = True
            self._wake.notify_all()

    def bytes_held(self) -> int:
        held = self._held
        return 0 if held is None else held.manifest.blob_bytes

    def wait_sent(self, *, timeout_s: float) -> None:
        """Blocks until every offered window has been sent (or sending failed, or ``timeout_s`` passed)."""
        with self._wake:
            self._wake.wait_for(lambda: (self._pending is None and self._sending is None) or self.error is not None
                                or self._abandoned or not self._sender.is_alive(), timeout=timeout_s)

    def close(self) -> None:
        """Sends what is pending, then the close header, and waits for the peer's close."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._sender.join()
        self._receiver.join()

    def _send_loop(self) -> None:
        try:
            while True:
                with self._wake:
                    self._wake.wait_for(lambda: self._pending is not None or self._closing or self._abandoned)
                    if self._abandoned:
                        return
                    image, self._pending = self._pending, None
                    self._sending = image
                if image is None:
                    send_image(None, self.send_to, group=self.group)
                    return
                self._send(image)
                with self._wake:
                    self._sending = None
                    self._wake.notify_all()
        except Exception as error:  # noqa: BLE001 - a torn-down group raises RuntimeError or ValueError
            self.error = failure_notice.explain(f"replication to rank {self.send_to} failed: {str(error).splitlines()[0]}")
            log.info(self.error)
            with self._wake:
                self._wake.notify_all()

    def _send(self, image: WindowImage) -> None:
        point = lambda: fault_point("replication", stage=self.stage, replica=self.replica,  # noqa: E731
                                    iteration=image.manifest.end_iteration)
        send_image(image, self.send_to, group=self.group, before_blob=point)
        self.windows_sent += 1
        self.bytes_sent += image.manifest.blob_bytes
        LEDGER.add_bytes(REPLICATED, image.manifest.blob_bytes)

    def _receive_loop(self) -> None:
        try:
            while True:
                image = recv_image(self.receive_from, group=self.group)
                if image is None:
                    return
                self._held = image  # only now does the previous replica go
                self.bytes_received += image.manifest.blob_bytes
        except Exception as error:  # noqa: BLE001 - a torn-down group raises RuntimeError or ValueError
            self.error = failure_notice.explain(f"replication from rank {self.receive_from} failed: {str(error).splitlines()[0]}")
            (log.warning if isinstance(error, SnapshotError) else log.info)(self.error)


def send_image(image: WindowImage | None, dst: int, *, group: dist.ProcessGroup | None = None,
               before_blob: Callable[[], None] | None = None) -> None:
    """Sends a window (or, for None, the header that says there is none / the stream ends)."""
    if image is None:
        dist.send(torch.tensor([MAGIC, _CLOSE, 0]), dst, group=group)
        return
    manifest = torch.frombuffer(bytearray(image.manifest.to_json()), dtype=torch.uint8)
    blob = image.blob[: image.manifest.blob_bytes]
    dist.send(torch.tensor([MAGIC, manifest.numel(), blob.numel()]), dst, group=group)
    dist.send(manifest, dst, group=group)
    if before_blob is not None:
        before_blob()
    if blob.numel():
        dist.send(blob, dst, group=group)


def recv_image(src: int, *, group: dist.ProcessGroup | None = None) -> WindowImage | None:
    """Receives what :func:`send_image` sent, verified by checksum; None for the empty header."""
    header = torch.empty(3, dtype=torch.int64)
    dist.recv(header, src, group=group)
    magic, manifest_bytes, blob_bytes = header.tolist()
    if magic != MAGIC:
        raise PeerFailure(f"rank {src} sent a window header {header.tolist()} without the magic {MAGIC:#x}; "
                          "a corrupted or forged stream: treating the sender as failed")
    if manifest_bytes == _CLOSE:
        return None
    check_wire_size(manifest_bytes, limit=MAX_MANIFEST_BYTES, peer=src, what="a window manifest")
    check_wire_size(blob_bytes, limit=transfer_limit(), peer=src, what="a window blob")
    manifest_raw = torch.empty(manifest_bytes, dtype=torch.uint8)
    dist.recv(manifest_raw, src, group=group)
    blob = torch.empty(blob_bytes, dtype=torch.uint8)
    if blob_bytes:
        dist.recv(blob, src, group=group)
    source = f"window from rank {src}"
    image = WindowImage(WindowManifest.from_json(manifest_raw.numpy().tobytes(), source=source), blob)
    image.verify(source=source)
    return image
