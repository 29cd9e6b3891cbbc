"""logging_store: a compressed host-memory store for the tensors a pipeline stage sends.

Standalone (depends on torch, numpy, lz4 and zstandard only). The pieces:

* :class:`LogStore` - thread-safe store keyed by :class:`LogKey`, with background compression,
  a memory budget that spills to disk, and export/import of iteration ranges as frame streams;
* :func:`encode` / :func:`decode` - one tensor <-> one self-describing frame (codecs ``none``,
  ``lz4``, ``zstd``; byte-shuffle and XOR-delta filters), the same bytes on disk and on the wire;
* :mod:`logging_store.filters` - the byte filters and checksum, native or numpy.
"""
from logging_store.chunks import Filter
from logging_store.codecs import Codec
from logging_store.config import LogStoreConfig
from logging_store.errors import (
    CorruptFrameError,
    DuplicateKeyError,
    FrameError,
    InvalidArgumentError,
    LogStoreError,
    MissingKeyError,
    ReferenceMismatchError,
    SpillError,
    StoreClosedError,
    TruncatedFrameError,
    UnsupportedFrameError,
)
from logging_store.filters import BACKEND
from logging_store.frame import FrameHeader, decode, encode, iter_frames, parse_header, read_frames
from logging_store.keys import LogKey
from logging_store.entries import EntryInfo, EntryState, StoreStats
from logging_store.store import LogStore

__all__ = [
    "BACKEND",
    "Codec",
    "CorruptFrameError",
    "DuplicateKeyError",
    "EntryInfo",
    "EntryState",
    "Filter",
    "FrameError",
    "FrameHeader",
    "InvalidArgumentError",
    "LogKey",
    "LogStore",
    "LogStoreConfig",
    "LogStoreError",
    "MissingKeyError",
    "ReferenceMismatchError",
    "SpillError",
    "StoreClosedError",
    "StoreStats",
    "TruncatedFrameError",
    "UnsupportedFrameError",
    "decode",
    "encode",
    "iter_frames",
    "parse_header",
    "read_frames",
]
