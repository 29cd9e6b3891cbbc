"""The shared-memory tier: window images in node-local ``/dev/shm`` files.

A file written there outlives the process that wrote it, so a replacement started on the same host
after a SIGKILL reads the last complete window without any copy over the network.

Double buffering: window ``n+1`` is captured into its own file while window ``n``'s file stays
untouched; ``complete.json`` (replaced atomically) names the newest complete window, and window
``n``'s file is unlinked only after that pointer moved. At every instant after the first window
completed, ``complete.json`` names a complete, intact window.

Privacy: the root is per user (``/dev/shm/moetion-<uid>`` by default) and, like the run and stage
directories under it, must be a real 0700 directory of this user (checked with ``lstat``; a
symlink or another user's directory is refused, never used). Window files are created with
``O_EXCL|O_NOFOLLOW``, mode 0600; a window read back must name this run, job, stage and replica.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from moetion.private_files import UnsafePathError, check_private_file, create_exclusive, private_dir, write_atomically
from moetion.run_identity import check_run_id
from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest

log = logging.getLogger(__name__)

POINTER = "complete.json"


class SharedMemoryTier:
    """This stage replica's directory of window files under a shared-memory root."""

    def __init__(self, root: Path | str, *, run_id: str, job_nonce: str, stage: int, replica: int) -> None:
        self.owner = dict(run_id=run_id, job_nonce=job_nonce, stage=stage, replica=replica)
        try:
            run_dir = private_dir(private_dir(root) / check_run_id(run_id))
            self.directory = private_dir(run_dir / f"stage-{stage:03d}-replica-{replica:03d}")
        except UnsafePathError as error:
            raise SnapshotError(f"shared-memory tier: {error}") from None

    def clear(self) -> None:
        """Forgets windows left by an earlier job under the same run id (a fresh job starts empty)."""
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)

    def new_blob(self, start_iteration: int, nbytes: int) -> torch.Tensor:
        """A zeroed uint8 tensor mapped from a fresh file for the window starting at ``start_iteration``."""
        path = self._blob_path(start_iteration)
        path.unlink(missing_ok=True)
        fd = create_exclusive(path, os.O_RDWR)  # 0600; fails on anything planted under this name
        try:
            os.ftruncate(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        return torch.from_file(str(path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)

    def publish(self, manifest: WindowManifest) -> None:
        """Makes a fully written window the complete one, then drops the window it replaces."""
        previous = self._pointed_manifest()
        write_atomically(self.directory / POINTER, manifest.to_json())
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
        manifest.check_owner(**self.owner, source=str(self.directory / POINTER))
        path = self._blob_path(manifest.start_iteration)
        try:
            size = check_private_file(path).st_size
        except (OSError, UnsafePathError) as error:
            raise SnapshotError(f"{path}: window blob unusable ({error})") from None
        if size < manifest.blob_bytes:
            raise SnapshotError(f"{path}: window blob shorter ({size} bytes) than its manifest's {manifest.blob_bytes}")
        blob = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        image = WindowImage(manifest, blob)
        if verify:
            image.verify(source=str(path))
        return image

    def _pointed_manifest(self) -> WindowManifest | None:
        pointer = self.directory / POINTER
        try:
            check_private_file(pointer)
            data = pointer.read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, UnsafePathError) as error:
            raise SnapshotError(f"{pointer}: unusable ({error})") from None
        return WindowManifest.from_json(data, source=str(pointer))

    def _blob_path(self, start_iteration: int) -> Path:
        return self.directory / f"window-{start_iteration:010d}.bin"
