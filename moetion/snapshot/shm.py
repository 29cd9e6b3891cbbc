"""The shared-memory tier: window images in node-local ``/dev/shm`` files.

A file written there outlives the process that wrote it, so a replacement started on the same host
after a SIGKILL reads the last complete window without any copy over the network.

Double buffering: window ``n+1`` is captured into its own file while window ``n``'s file stays
untouched; ``complete.json`` (replaced atomically) names the newest complete window, and window
``n``'s file is retired only after that pointer moved. At every instant after the first window
completed, ``complete.json`` names a complete, intact window.

Privacy: the root is per user (``/dev/shm/moetion-<uid>`` by default) and, like the run and stage
directories under it, must be a real 0700 directory of this user (checked with ``lstat``; a
symlink or another user's directory is refused, never used). Window files are created with
``O_EXCL|O_NOFOLLOW``, mode 0600; a window read back must name this run, job, stage and replica.

Group keeping (expert parallelism, where a stage's replicas replay together from a window every
one of them holds): ``publish(..., keep_from=c)`` keeps every complete window starting at or after
``c`` besides the new one, each with its manifest in ``window-<start>.json``, until
:meth:`retire_before` moves ``c`` on; a replacement finds them with :meth:`held_starts`.

Recycling: a retired window's file is not unlinked but kept, still mapped, as the *spare*; the next
window that fits takes it over by a rename. In steady state no window creates a file or touches a
fresh page (first-touch page faults cost more than the copy itself on CPU). A spare is taken only if
no background tier (replication, persisting) still reads it; otherwise the window gets a fresh file.
Recycled files are not zeroed: bytes outside the manifest's entries (alignment padding) are
leftovers, and nothing reads them.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from moetion.private_files import UnsafePathError, check_private_file, create_exclusive, private_dir, write_atomically
from moetion.run_identity import check_run_id
from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest

log = logging.getLogger(__name__)

POINTER = "complete.json"
SPARE = "spare.bin"


class SharedMemoryTier:
    """This stage replica's directory of window files under a shared-memory root."""

    def __init__(self, root: Path | str, *, run_id: str, job_nonce: str, stage: int, replica: int) -> None:
        self.owner = dict(run_id=run_id, job_nonce=job_nonce, stage=stage, replica=replica)
        try:
            run_dir = private_dir(private_dir(root) / check_run_id(run_id))
            self.directory = private_dir(run_dir / f"stage-{stage:03d}-replica-{replica:03d}")
        except UnsafePathError as error:
            raise SnapshotError(f"shared-memory tier: {error}") from None
        self._lock = threading.Lock()  # new_blob and publish run on the capture thread, load_complete anywhere
        self._mapped: dict[int, torch.Tensor] = {}  # windows this process mapped, by start iteration
        self._spare: torch.Tensor | None = None  # the mapping of SPARE, a retired window's file
        self._kept = self._scan_kept()  # complete windows kept for a group replay, by start (a predecessor's too)
        # The manifest this process last wrote to the pointer: what the pointer says, without parsing it back.
        self._published: WindowManifest | None = None
        self.files_created = 0
        self.files_recycled = 0

    def clear(self) -> None:
        """Forgets windows left by an earlier job under the same run id (a fresh job starts empty)."""
        with self._lock:
            self._mapped.clear()
            self._spare = None
            self._kept = set()
            self._published = None
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)

    def new_blob(self, start_iteration: int, nbytes: int, *,
                 in_use: Callable[[torch.Tensor], bool] = lambda blob: False) -> torch.Tensor:
        """A uint8 tensor of at least ``nbytes`` mapped from the file of the window starting at
        ``start_iteration``: the spare renamed, if it is big enough and ``in_use`` says no reader
        holds it, else a fresh (zeroed) file."""
        path = self._blob_path(start_iteration)
        with self._lock:
            spare, self._spare = self._spare, None
            if spare is not None and spare.numel() >= nbytes and not in_use(spare):
                os.replace(self.directory / SPARE, path)
                self.files_recycled += 1
                blob = spare
            else:
                (self.directory / SPARE).unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                blob = _map_file(path, max(nbytes, 1))
                self.files_created += 1
            self._mapped[start_iteration] = blob
        return blob

    def publish(self, manifest: WindowManifest, *, keep_from: int | None = None) -> None:
        """Makes a fully written window the complete one, then retires the window it replaces
        (``keep_from``: only the kept windows starting before it)."""
        start = manifest.start_iteration
        if keep_from is not None:
            write_atomically(self._manifest_path(start), manifest.to_json())
        previous = self._pointed_manifest()
        write_atomically(self.directory / POINTER, manifest.to_json())
        self._published = manifest
        if keep_from is not None:
            with self._lock:
                self._kept.add(start)
            self.retire_before(keep_from)
        elif previous is not None and previous.start_iteration != start:
            self._retire(previous.start_iteration)
        log.info("window %d..%d complete in shared memory (%d bytes)",
                 manifest.start_iteration, manifest.end_iteration, manifest.blob_bytes)

    def held_starts(self) -> list[int]:
        """Starts of the complete windows kept for a group replay, oldest first (the newest included)."""
        with self._lock:
            return sorted(self._kept)

    def retire_before(self, start: int) -> None:
        """Retires the kept windows starting before ``start``, never the newest complete one."""
        newest = self.complete_start()
        with self._lock:
            old = [s for s in self._kept if s < start and s != newest]
            self._kept.difference_update(old)
        for s in old:
            self._manifest_path(s).unlink(missing_ok=True)
            self._retire(s)

    def bytes_held(self) -> int:
        """Bytes of every file held, the spare included (read once per iteration by the metrics: scandir, not glob)."""
        try:
            with os.scandir(self.directory) as entries:
                return sum(e.stat().st_size for e in entries if e.name.endswith(".bin"))
        except FileNotFoundError:
            return 0

    def load_complete(self, *, verify: bool = True) -> WindowImage:
        """The newest complete window, mapped (a private mapping unless this process wrote it: never
        write through it); verified by checksum unless told not to."""
        manifest = self._pointed_manifest()
        if manifest is None:
            raise SnapshotError(f"no complete window in shared memory at {self.directory}")
        return self._load(manifest, source=self.directory / POINTER, verify=verify)

    def load_kept(self, start: int) -> WindowImage:
        """A window kept for a group replay (the newest too), mapped and verified as :meth:`load_complete`."""
        path = self._manifest_path(start)
        try:
            check_private_file(path)
            manifest = WindowManifest.from_json(path.read_bytes(), source=str(path))
        except (OSError, UnsafePathError) as error:
            raise SnapshotError(f"{path}: kept window unusable ({error})") from None
        if manifest.start_iteration != start:
            raise SnapshotError(f"{path}: names window {manifest.start_iteration}, not {start}")
        return self._load(manifest, source=path, verify=True)

    def _load(self, manifest: WindowManifest, *, source: Path, verify: bool) -> WindowImage:
        manifest.check_owner(**self.owner, source=str(source))
        path = self._blob_path(manifest.start_iteration)
        try:
            size = check_private_file(path).st_size
        except (OSError, UnsafePathError) as error:
            raise SnapshotError(f"{path}: window blob unusable ({error})") from None
        if size < manifest.blob_bytes:
            raise SnapshotError(f"{path}: window blob shorter ({size} bytes) than its manifest's {manifest.blob_bytes}")
        with self._lock:
            mine = self._mapped.get(manifest.start_iteration)
        # This process's own mapping when it wrote the window, so that a tier reading the image is
        # recognised by new_blob's in_use check (a second mapping would have another address).
        blob = mine if mine is not None else _map_file(path, size, shared=False)
        image = WindowImage(manifest, blob)
        if verify:
            image.verify(source=str(path))
        return image

    def complete_start(self) -> int | None:
        """First iteration of the newest complete window (None: none yet), without mapping it."""
        manifest = self._pointed_manifest()
        return None if manifest is None else manifest.start_iteration

    def _pointed_manifest(self) -> WindowManifest | None:
        if self._published is not None:
            return self._published
        pointer = self.directory / POINTER
        try:
            check_private_file(pointer)
            data = pointer.read_bytes()
        except FileNotFoundError:
            return None
        except (OSError, UnsafePathError) as error:
            raise SnapshotError(f"{pointer}: unusable ({error})") from None
        return WindowManifest.from_json(data, source=str(pointer))

    def _retire(self, start_iteration: int) -> None:
        """The replaced window's file becomes the spare if this process mapped it, else it goes."""
        path = self._blob_path(start_iteration)
        with self._lock:
            blob = self._mapped.pop(start_iteration, None)
            if blob is None or self._spare is not None:
                path.unlink(missing_ok=True)
                return
            os.replace(path, self.directory / SPARE)
            self._spare = blob

    def _scan_kept(self) -> set[int]:
        """Starts of the kept windows' manifests in the directory; any other name is not one of ours."""
        starts = (p.name[len("window-"):-len(".json")] for p in self.directory.glob("window-*.json"))
        return {int(s) for s in starts if s.isdigit()}

    def _blob_path(self, start_iteration: int) -> Path:
        return self.directory / f"window-{start_iteration:010d}.bin"

    def _manifest_path(self, start_iteration: int) -> Path:
        return self.directory / f"window-{start_iteration:010d}.json"


def _map_file(path: Path, nbytes: int, *, shared: bool = True) -> torch.Tensor:
    """The one place a window file is opened: ``nbytes`` of it mapped as a uint8 tensor. ``shared``:
    a new file, created 0600 with O_EXCL|O_NOFOLLOW (anything planted under its name is refused),
    whose writes go to the file; otherwise an existing file, checked by the caller, mapped privately."""
    if shared:
        fd = create_exclusive(path, os.O_RDWR)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    return torch.from_file(str(path), shared=shared, size=nbytes, dtype=torch.uint8)
