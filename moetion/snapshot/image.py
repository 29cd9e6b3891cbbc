"""A window image: everything one stage replica captured over one complete window.

An image is a JSON manifest plus one contiguous blob of raw tensor bytes. Every tier (shared
memory, a peer's memory, disk) stores and moves exactly this pair, so there is one format to
validate: no pickle, a checksum per tensor, and bounds checked before anything is read. The
manifest carries its own checksum (SHA-256 of its canonical JSON) and whose window it is (run id,
job nonce, stage, replica); every field is type-checked on read (a bool is not an int, a string
is not a number), so a damaged or edited manifest is a one-line error, never a traceback.

Capture ``i`` of a window starting at ``t0`` holds, as of after step ``t0 + i``, the full
snapshot (fp32 weight plus every optimizer tensor) of slot ``i``'s operators and the compute
snapshot of every operator in a later slot.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch

from logging_store import filters
from moetion.errors import MoetionError

FORMAT = "moetion-window/2"
CHECKSUM_FIELD = "manifest_sha256"
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
    job_nonce: str  # the job that captured it: a fresh job never adopts another job's window
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
        """The manifest as written to every tier; encoded once (shared memory, the peer and the disk
        all take the same bytes), with plain loops: ``dataclasses.asdict`` deep-copies every field
        of hundreds of entries and was most of the capture thread's CPU."""
        return self._json

    @cached_property
    def _json(self) -> bytes:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["captures"] = [{"iteration": c.iteration, "entries": [_entry_body(e) for e in c.entries]}
                            for c in self.captures]
        return json.dumps({**body, CHECKSUM_FIELD: manifest_digest(body)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "manifest") -> "WindowManifest":
        """Parses, checksums, type-checks and validates a manifest; SnapshotError naming the problem."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise SnapshotError(f"{source}: not JSON ({error}); the manifest is damaged") from None
        fields = _Fields(raw, source, "manifest")
        if raw.get("format") != FORMAT:
            raise SnapshotError(f"{source}: format {raw.get('format')!r}, expected {FORMAT!r}")
        stored = fields.get(CHECKSUM_FIELD, str)
        body = {k: v for k, v in raw.items() if k != CHECKSUM_FIELD}
        if manifest_digest(body) != stored:
            raise SnapshotError(f"{source}: manifest checksum mismatch (stored {stored[:16]}..., computed "
                                f"{manifest_digest(body)[:16]}...): the manifest was changed or damaged; use another copy")
        captures = []
        for i, c in enumerate(fields.get("captures", list)):
            capture = _Fields(c, source, f"captures[{i}]")
            entries = []
            for j, e in enumerate(capture.get("entries", list)):
                entry = _Fields(e, source, f"captures[{i}].entries[{j}]")
                entries.append(Entry(
                    operator=entry.get("operator", str), param=entry.get("param", str), role=entry.get("role", str),
                    dtype=entry.get("dtype", str), shape=tuple(entry.items("shape", int)),
                    offset=entry.get("offset", int), nbytes=entry.get("nbytes", int),
                    checksum=entry.get("checksum", int)))
            captures.append(Capture(capture.get("iteration", int), tuple(entries)))
        slots = tuple(tuple(_Fields({"slot": s}, source, f"slots[{i}]").items("slot", str))
                      for i, s in enumerate(fields.get("slots", list)))
        manifest = cls(
            run_id=fields.get("run_id", str), job_nonce=fields.get("job_nonce", str), stage=fields.get("stage", int),
            replica=fields.get("replica", int), start_iteration=fields.get("start_iteration", int), slots=slots,
            precision=fields.get("precision", str), threads=fields.get("threads", int), captures=tuple(captures),
            blob_bytes=fields.get("blob_bytes", int), extra=fields.get("extra", dict),
        )
        manifest.validate(source=source)
        return manifest

    def check_owner(self, *, run_id: str, job_nonce: str, stage: int, replica: int, source: str) -> None:
        """SnapshotError unless this window was captured by (run, job, stage, replica)."""
        expected = (run_id, job_nonce, stage, replica)
        found = (self.run_id, self.job_nonce, self.stage, self.replica)
        if found != expected:
            raise SnapshotError(f"{source}: window of run {self.run_id!r} (job {self.job_nonce}) stage {self.stage} "
                                f"replica {self.replica}, expected run {run_id!r} (job {job_nonce}) stage {stage} "
                                f"replica {replica}; it is not this job's window, refusing it")

    def validate(self, *, source: str = "manifest") -> None:
        """Checks internal consistency, so reading entries can never leave the blob."""
        if min(self.stage, self.replica, self.threads, self.blob_bytes) < 0 or self.threads < 1:
            raise SnapshotError(f"{source}: stage {self.stage}, replica {self.replica}, threads {self.threads} and "
                                f"blob_bytes {self.blob_bytes} must be non-negative (threads at least 1)")
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
            for e, got in zip(capture.entries, entry_checksums(self.blob, capture.entries)):
                if got != e.checksum:
                    raise SnapshotError(
                        f"{source}: checksum mismatch in iteration {capture.iteration}, {e.param} ({e.role}): "
                        f"stored {e.checksum:#x}, computed {got:#x}; the copy is corrupted, use another tier"
                    )


class _Fields:
    """Typed access to one JSON object of a manifest: a missing or wrongly typed field is a
    SnapshotError naming it (``bool`` is not accepted as ``int``)."""

    def __init__(self, raw: Any, source: str, where: str) -> None:
        if not isinstance(raw, dict):
            raise SnapshotError(f"{source}: {where} is a {type(raw).__name__}, expected an object")
        self.raw, self.source, self.where = raw, source, where

    def get(self, name: str, kind: type) -> Any:
        if name not in self.raw:
            raise SnapshotError(f"{self.source}: {self.where} has no field {name!r}; the manifest is incomplete")
        return self._typed(self.raw[name], kind, name)

    def items(self, name: str, kind: type) -> list:
        return [self._typed(v, kind, f"{name}[{i}]") for i, v in enumerate(self.get(name, list))]

    def _typed(self, value: Any, kind: type, name: str) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SnapshotError(f"{self.source}: {self.where}.{name} is {type(value).__name__} {value!r:.40}, "
                                f"expected {kind.__name__}; the manifest is damaged")
        return value


_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))


def _entry_body(entry: Entry) -> dict[str, Any]:
    return {name: getattr(entry, name) for name in _ENTRY_FIELDS}


def manifest_digest(body: dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON (every field but the checksum itself)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def entry_view(blob: torch.Tensor, entry: Entry) -> torch.Tensor:
    """The entry's bytes in ``blob`` as a tensor of its dtype and shape: a view, no copy."""
    return blob[entry.offset : entry.offset + entry.nbytes].view(_DTYPES[entry.dtype]).reshape(entry.shape)


def checksum(raw: torch.Tensor) -> int:
    return filters.checksum(raw.numpy())


def entry_checksums(blob: torch.Tensor, entries: Sequence[Entry]) -> list[int]:
    """The checksum of every entry's bytes in ``blob``, in one native call: one release of the GIL
    for many tensors, where a call per tensor made the training thread wait for it back each time."""
    spans = np.array([(e.offset, e.nbytes) for e in entries], dtype=np.int64).reshape(-1, 2)
    sums = np.empty(len(entries), dtype=np.uint64)
    filters.checksums(blob.numpy(), spans, sums)
    return sums.tolist()


def with_checksums(blob: torch.Tensor, entries: Sequence[Entry]) -> tuple[Entry, ...]:
    """``entries`` with the checksums of their bytes in ``blob`` filled in."""
    return tuple(replace(e, checksum=c) for e, c in zip(entries, entry_checksums(blob, entries)))


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype)
    if name not in _DTYPES:
        raise SnapshotError(f"cannot snapshot tensors of dtype {dtype}")
    return name


def tensor_dtype(name: str, *, source: str = "window") -> torch.dtype:
    """The dtype a manifest names, if it is one of the few a snapshot may hold."""
    if name not in _DTYPES:
        raise SnapshotError(f"{source}: unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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
