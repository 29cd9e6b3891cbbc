"""The shared-memory tier: window images in node-local ``/dev/shm`` files.

A file written there outlives the process that wrote it, so a replacement started on the same host
after a SIGKILL reads the last complete window without any copy over the network.

Double buffering: window ``n+1`` is captured into its own file while window ``n``'s file stays
untouched; ``complete.json`` (replaced atomically) names the newest complete window, and window
``n``'s file is unlinked only after that pointer moved. At every instant after the first window
completed, ``complete.json`` names a complete, intact window.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest

log = logging.getLogger(__name__)

POINTER = "complete.json"


class SharedMemoryTier:
    """This stage replica's directory of window files under a shared-memory root."""

    def __init__(self, root: Path | str, *, run_id: str, stage: int, replica: int) -> None:
        self.directory = Path(root) / run_id / f"stage-{stage:03d}-replica-{replica:03d}"
        self.directory.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Forgets windows left by an earlier job under the same run id (a fresh job starts empty)."""
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)

    def new_blob(self, start_iteration: int, nbytes: int) -> torch.Tensor:
        """A zeroed uint8 tensor mapped from a fresh file for the window starting at ``start_iteration``."""
        path = self._blob_path(start_iteration)
        path.unlink(missing_ok=True)
        return torch.from_file(str(path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)

    def publish(self, manifest: WindowManifest) -> None:
        """Makes a fully written window the complete one, then drops the window it replaces."""
        previous = self._pointed_manifest()
        tmp = self.directory / f".{POINTER}.tmp"
        tmp.write_bytes(manifest.to_json())
        os.replace(tmp, self.directory / POINTER)
        if previous is not None and previous.start_iteration != manifest.start_iteration:
            self._blob_path(previous.start_iteration).unlink(missing_ok=True)
        log.info("window %d..%d complete in shared memory (%d bytes)",
                 manifest.start_iteration, manifest.end_iteration, manifest.blob_bytes)

    def bytes_held(self) -> int:
        """Bytes of this stage replica's window files (read once per iteration by the metrics: scandir, not glob)."""
        try:
            with os.scandir(self.directory) as entries:
                return sum(e.stat().st_size for e in entries if e.name.startswith("window-") and e.name.endswith(".bin"))
        except FileNotFoundError:
            return 0

    def load_complete(self, *, verify: bool = True) -> WindowImage:
        """The newest complete window, mapped read-only; verified by checksum unless told not to."""
        manifest = self._pointed_manifest()
        if manifest is None:
            raise SnapshotError(f"no complete window in shared memory at {self.directory}")
        path = self._blob_path(manifest.start_iteration)
        if not path.exists() or path.stat().st_size < manifest.blob_bytes:
            raise SnapshotError(f"{path}: window blob missing or shorter than its manifest's {manifest.blob_bytes} bytes")
        blob = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
        image = WindowImage(manifest, blob)
        if verify:
            image.verify(source=str(path))
        return image

    def _pointed_manifest(self) -> WindowManifest | None:
        pointer = self.directory / POINTER
        if not pointer.exists():
            return None
        return WindowManifest.from_json(pointer.read_bytes(), source=str(pointer))

    def _blob_path(self, start_iteration: int) -> Path:
        return self.directory / f"window-{start_iteration:010d}.bin"
