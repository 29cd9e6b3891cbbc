"""Spill segments: files of concatenated frames that hold entries evicted from memory.

A segment is written once, in one go, and deleted when the last entry in it is dropped (and no
reader is still using it). The directory is private to one store (a fresh temporary directory
under the configured parent) and is removed by :meth:`SpillDirectory.close`. Spilling is an
overflow of memory, not persistence: nothing is fsynced.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from logging_store.errors import SpillError

_log = logging.getLogger(__name__)


class Segment:
    """One spill file; reference-counted by the entries in it and by readers in progress."""

    __slots__ = ("path", "refs")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.refs = 1  # the writer's reference, handed over to the store by SpillDirectory.write


class SpillDirectory:
    """Writes, reads and deletes the spill segments of one store."""

    def __init__(self, parent: str | os.PathLike[str] | None) -> None:
        self._parent = parent
        self._path: Path | None = None
        self._lock = threading.Lock()
        self._count = 0
        self._closed = False

    @property
    def path(self) -> Path | None:
        """The directory, once the first segment was written."""
        return self._path

    def write(self, frames: Sequence[Sequence[Any]]) -> tuple[Segment, list[tuple[int, int]]]:
        """Writes frames (each a list of buffers) as one segment; returns it and (offset, length) per frame.

        The caller owns one reference to the returned segment.
        """
        with self._lock:
            if self._closed:
                raise SpillError("the spill directory is closed")
            if self._path is None:
                self._path = self._make_directory()
            path = self._path / f"segment-{self._count:06d}.lsf"
            self._count += 1
        placements = []
        offset = 0
        try:
            # 0600 and never through a planted name: segments hold data-derived tensors
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as file:
                for parts in frames:
                    length = sum(memoryview(part).nbytes for part in parts)
                    file.writelines(parts)
                    placements.append((offset, length))
                    offset += length
        except OSError as error:
            path.unlink(missing_ok=True)
            raise SpillError(
                f"could not write spill segment {path} ({offset} bytes written): {error}; "
                "free disk space or point spill_dir at a larger disk"
            ) from error
        _log.debug("spilled %d frames, %d bytes, to %s", len(frames), offset, path)
        return Segment(path), placements

    def read(self, segment: Segment, offset: int, length: int) -> bytes:
        """The bytes of one frame of ``segment`` (the caller holds a reference to it)."""
        try:
            with open(segment.path, "rb") as file:
                file.seek(offset)
                data = file.read(length)
        except OSError as error:
            raise SpillError(f"could not read spill segment {segment.path}: {error}") from error
        if len(data) != length:
            raise SpillError(
                f"spill segment {segment.path} ends at {offset + len(data)} bytes, expected at least "
                f"{offset + length}; something outside the store truncated it"
            )
        return data

    def retain(self, segment: Segment) -> None:
        with self._lock:
            segment.refs += 1

    def release(self, segment: Segment) -> None:
        """Drops one reference; the last one deletes the file."""
        with self._lock:
            segment.refs -= 1
            last = segment.refs == 0
        if last:
            segment.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Deletes the directory and every segment in it."""
        with self._lock:
            self._closed = True
            path, self._path = self._path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def _make_directory(self) -> Path:
        try:
            if self._parent is not None:
                os.makedirs(self._parent, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="logstore-", dir=self._parent))
        except OSError as error:
            raise SpillError(f"could not create a spill directory under {self._parent or tempfile.gettempdir()}: {error}") from error
