"""A window image: everything one stage replica captured over one complete window.

An image is a JSON manifest plus one contiguous blob of raw tensor bytes. Every tier (shared
memory, a peer's memory, disk) stores and moves exactly this pair, so there is one format to
validate: no pickle, a checksum per tensor, and bounds checked before anything is read.

Capture ``i`` of a window starting at ``t0`` holds, as of after step ``t0 + i``, the full
snapshot (fp32 weight plus every optimizer tensor) of slot ``i``'s operators and the compute
snapshot of every operator in a later slot.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from logging_store import filters
from moetion.errors import MoetionError

FORMAT = "moetion-window/1"
ALIGN = 64
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)}


class SnapshotError(MoetionError):
    """A window image is missing, inconsistent or corrupted."""


@dataclass(frozen=True)
class Entry:
    """One tensor in the blob. ``role`` is ``weight``, ``compute`` or ``optim.<state key>``."""

    operator: str
    param: str
    role: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: int = 0


@dataclass(frozen=True)
class Capture:
    iteration: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class WindowManifest:
    run_id: str
    stage: int
    replica: int
    start_iteration: int
    slots: tuple[tuple[str, ...], ...]
    precision: str
    threads: int
    captures: tuple[Capture, ...]
    blob_bytes: int
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> int:
        return len(self.slots)

    @property
    def end_iteration(self) -> int:
        return self.start_iteration + self.window - 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "manifest") -> "WindowManifest":
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise SnapshotError(f"{source}: format {raw.get('format')!r}, expected {FORMAT!r}")
            captures = tuple(
                Capture(int(c["iteration"]), tuple(Entry(**{**e, "shape": tuple(e["shape"])}) for e in c["entries"]))
                for c in raw["captures"]
            )
            manifest = cls(
                run_id=str(raw["run_id"]), stage=int(raw["stage"]), replica=int(raw["replica"]),
                start_iteration=int(raw["start_iteration"]), slots=tuple(tuple(s) for s in raw["slots"]),
                precision=str(raw["precision"]), threads=int(raw["threads"]), captures=captures,
                blob_bytes=int(raw["blob_bytes"]), extra=dict(raw.get("extra", {})),
            )
        except SnapshotError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SnapshotError(f"{source}: not a valid window manifest ({type(error).__name__}: {error})") from None
        manifest.validate(source=source)
        return manifest

    def validate(self, *, source: str = "manifest") -> None:
        """Checks internal consistency, so reading entries can never leave the blob."""
        if len(self.captures) != self.window:
            raise SnapshotError(f"{source}: {len(self.captures)} captures for a window of {self.window}")
        for i, capture in enumerate(self.captures):
            if capture.iteration != self.start_iteration + i:
                raise SnapshotError(f"{source}: capture {i} is of iteration {capture.iteration}, expected {self.start_iteration + i}")
            for e in capture.entries:
                if e.dtype not in _DTYPES:
                    raise SnapshotError(f"{source}: entry {e.param}/{e.role} has unsupported dtype {e.dtype}")
                expected = _numel(e.shape) * _itemsize(e.dtype)
                if e.nbytes != expected or e.offset < 0 or e.offset + e.nbytes > self.blob_bytes:
                    raise SnapshotError(
                        f"{source}: entry {e.param}/{e.role} spans bytes {e.offset}..{e.offset + e.nbytes} "
                        f"({e.nbytes} for shape {list(e.shape)} {e.dtype}) outside a blob of {self.blob_bytes}"
                    )


@dataclass
class WindowImage:
    """A manifest and its blob (a uint8 tensor, possibly mapped from a file)."""

    manifest: WindowManifest
    blob: torch.Tensor

    def tensor(self, entry: Entry) -> torch.Tensor:
        """A copy of one entry's tensor (copies, because the blob may be replaced underneath)."""
        raw = self.blob[entry.offset : entry.offset + entry.nbytes]
        return raw.view(_DTYPES[entry.dtype]).reshape(entry.shape).clone()

    def verify(self, *, source: str = "window") -> None:
        """Checks the blob's size and every entry's checksum; raises SnapshotError naming the first bad one."""
        if self.blob.numel() < self.manifest.blob_bytes:
            raise SnapshotError(f"{source}: blob holds {self.blob.numel()} bytes, manifest needs {self.manifest.blob_bytes}")
        for capture in self.manifest.captures:
            for e in capture.entries:
                got = checksum(self.blob[e.offset : e.offset + e.nbytes])
                if got != e.checksum:
                    raise SnapshotError(
                        f"{source}: checksum mismatch in iteration {capture.iteration}, {e.param} ({e.role}): "
                        f"stored {e.checksum:#x}, computed {got:#x}; the copy is corrupted, use another tier"
                    )


def entry_view(blob: torch.Tensor, entry: Entry) -> torch.Tensor:
    """The entry's bytes in ``blob`` as a tensor of its dtype and shape: a view, no copy."""
    return blob[entry.offset : entry.offset + entry.nbytes].view(_DTYPES[entry.dtype]).reshape(entry.shape)


def checksum(raw: torch.Tensor) -> int:
    return filters.checksum(raw.numpy())


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype)
    if name not in _DTYPES:
        raise SnapshotError(f"cannot snapshot tensors of dtype {dtype}")
    return name


def aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            return -1
        n *= d
    return n


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=_DTYPES[dtype]).element_size()
