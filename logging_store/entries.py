"""The records of a log store: where an entry's bytes are, and the store's exact accounting."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from logging_store.chunks import EncodedPayload
from logging_store.keys import LogKey
from logging_store.pool import Lease
from logging_store.spill import Segment


class EntryState(enum.Enum):
    """Where an entry's bytes are: pool memory as put, encoded in memory, or in a spill segment."""

    RAW = "raw"
    ENCODED = "encoded"
    SPILLED = "spilled"


class Entry:
    """One logged tensor: its key, shape and dtype, and where its bytes live now (internal)."""

    __slots__ = ("key", "dtype", "shape", "raw_length", "state", "lease", "payload", "stored_length",
                 "segment", "offset", "version")

    def __init__(self, key: LogKey, dtype: torch.dtype, shape: tuple[int, ...], raw_length: int) -> None:
        self.key = key
        self.dtype = dtype
        self.shape = shape
        self.raw_length = raw_length
        self.state = EntryState.RAW
        self.lease: Lease | None = None
        self.payload: EncodedPayload | None = None
        self.stored_length = raw_length
        self.segment: Segment | None = None
        self.offset = 0
        self.version = 0

    def hold_raw(self, lease: Lease) -> None:
        self.state, self.lease, self.stored_length = EntryState.RAW, lease, self.raw_length

    def hold_encoded(self, payload: EncodedPayload) -> None:
        self.state, self.payload, self.lease = EntryState.ENCODED, payload, None
        self.stored_length = sum(len(memoryview(chunk)) for chunk in payload.chunks)
        self.version += 1

    def hold_spilled(self, segment: Segment, offset: int, length: int) -> None:
        self.state, self.segment, self.offset, self.stored_length = EntryState.SPILLED, segment, offset, length
        self.lease = self.payload = None
        self.version += 1


@dataclass(frozen=True)
class EntryInfo:
    """Where one entry is and what it costs."""

    key: LogKey
    dtype: torch.dtype
    shape: tuple[int, ...]
    state: EntryState
    raw_bytes: int
    stored_bytes: int  # raw: raw bytes; encoded: stored chunk bytes; spilled: frame bytes on disk


@dataclass(frozen=True)
class StoreStats:
    """Exact accounting of a store at one instant (all byte counts are sums over live entries)."""

    entries: int
    raw_entries: int
    encoded_entries: int
    spilled_entries: int
    pending_entries: int  # raw entries waiting for a compression worker
    raw_bytes: int  # bytes of the tensors as put
    stored_bytes: int  # resident_bytes + spilled_bytes
    resident_bytes: int  # in memory: raw entries at full size, encoded ones at stored size
    spilled_bytes: int  # on disk, frame headers included
    compressed_total: int  # entries encoded by workers since the store opened
    spilled_total: int  # entries spilled since the store opened
    pool_bytes: int  # pool memory allocated (raw entries live here)
    pool_free_bytes: int

    @property
    def ratio(self) -> float:
        """raw_bytes / stored_bytes (1.0 for an empty store)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0
