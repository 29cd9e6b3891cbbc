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

import torch
import torch.distributed as dist

from moetion.faults import fault_point
from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest
from moetion.topology import PipeTopology

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
        self._closing = False
        self._wake = threading.Condition()
        self.error: str | None = None
        self.windows_sent = 0
        self._sender = threading.Thread(target=self._send_loop, name="moetion-replica-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="moetion-replica-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    def offer(self, image: WindowImage) -> None:
        """Queues a complete window for the peer; a newer one supersedes one not yet sent."""
        with self._wake:
            self._pending = image
            self._wake.notify()

    def held(self) -> WindowImage | None:
        """The last complete, verified window received from ``receive_from``."""
        return self._held

    def bytes_held(self) -> int:
        held = self._held
        return 0 if held is None else held.manifest.blob_bytes

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
                    self._wake.wait_for(lambda: self._pending is not None or self._closing)
                    image, self._pending = self._pending, None
                if image is None:
                    dist.send(torch.tensor([MAGIC, _CLOSE, 0]), self.send_to, group=self.group)
                    return
                self._send(image)
        except RuntimeError as error:
            self.error = f"replication to rank {self.send_to} failed: {str(error).splitlines()[0]}"
            log.warning(self.error)

    def _send(self, image: WindowImage) -> None:
        manifest = torch.frombuffer(bytearray(image.manifest.to_json()), dtype=torch.uint8)
        blob = image.blob[: image.manifest.blob_bytes]
        dist.send(torch.tensor([MAGIC, manifest.numel(), blob.numel()]), self.send_to, group=self.group)
        dist.send(manifest, self.send_to, group=self.group)
        fault_point("replication", stage=self.stage, replica=self.replica, iteration=image.manifest.end_iteration)
        if blob.numel():
            dist.send(blob, self.send_to, group=self.group)
        self.windows_sent += 1

    def _receive_loop(self) -> None:
        try:
            while True:
                header = torch.empty(3, dtype=torch.int64)
                dist.recv(header, self.receive_from, group=self.group)
                magic, manifest_bytes, blob_bytes = header.tolist()
                if magic != MAGIC or manifest_bytes > MAX_MANIFEST_BYTES or blob_bytes < 0:
                    raise SnapshotError(f"bad replication header {header.tolist()} from rank {self.receive_from}")
                if manifest_bytes == _CLOSE:
                    return
                manifest_raw = torch.empty(manifest_bytes, dtype=torch.uint8)
                dist.recv(manifest_raw, self.receive_from, group=self.group)
                blob = torch.empty(blob_bytes, dtype=torch.uint8)
                if blob_bytes:
                    dist.recv(blob, self.receive_from, group=self.group)
                source = f"replica from rank {self.receive_from}"
                image = WindowImage(WindowManifest.from_json(manifest_raw.numpy().tobytes(), source=source), blob)
                image.verify(source=source)
                self._held = image  # only now does the previous replica go
        except (RuntimeError, SnapshotError) as error:
            self.error = f"replication from rank {self.receive_from} failed: {str(error).splitlines()[0]}"
            log.warning(self.error)
