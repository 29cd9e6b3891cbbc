"""Turns raw chunks into stored chunks and back: filters, then codec, with per-chunk checksums.

A frame's payload is a list of stored chunks, each holding ``chunk_bytes`` raw bytes (the last one
fewer). Per chunk, encoding is: XOR against the reference (optional) -> byte-shuffle (optional) ->
codec. A chunk the codec cannot shrink is stored filtered but uncompressed, so a stored chunk is
never longer than its raw chunk and ``len(stored) == len(raw)`` means "not compressed".

Checksums are trees so chunks can be processed independently: the raw checksum of a payload is
``checksum(le64(checksum(raw chunk 0)) || le64(checksum(raw chunk 1)) || ...)`` and the stored
checksum is ``checksum(chunk table || le64 stored-chunk checksums)``.
"""
from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from logging_store import filters
from logging_store.codecs import Codec, compress, decompress
from logging_store.errors import CorruptFrameError

CHUNK_TABLE_ENTRY = 4  # bytes per stored-chunk length in the chunk table (uint32)


class Filter(enum.IntFlag):
    """Filter bits as written in frames (never renumber)."""

    NONE = 0
    SHUFFLE = 1
    XOR_DELTA = 2


@dataclass(frozen=True)
class EncodedPayload:
    """The payload of one frame: stored chunks plus the checksums the header records."""

    codec: Codec
    filters: Filter
    chunk_bytes: int
    chunks: Sequence[Any]  # bytes, or zero-copy views for unfiltered uncompressed payloads
    raw_checksum: int
    stored_checksum: int
    reference_checksum: int

    @property
    def stored_length(self) -> int:
        """Bytes of chunk table plus stored chunks, as written after the frame header."""
        return CHUNK_TABLE_ENTRY * len(self.chunks) + sum(len(memoryview(c)) for c in self.chunks)

    def table(self) -> bytes:
        return chunk_table([len(memoryview(c)) for c in self.chunks])


def chunk_table(stored_lengths: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(stored_lengths)}I", *stored_lengths)


def combine_checksums(checksums: Sequence[int], prefix: bytes = b"") -> int:
    """One checksum over per-chunk checksums (and an optional prefix such as the chunk table)."""
    return filters.checksum(prefix + struct.pack(f"<{len(checksums)}Q", *checksums))


def chunk_views(data: np.ndarray, chunk_bytes: int) -> list[np.ndarray]:
    """Splits a flat uint8 array into consecutive views of ``chunk_bytes`` (the last shorter)."""
    return [data[start : start + chunk_bytes] for start in range(0, data.size, chunk_bytes)]


def tree_checksum(regions: Sequence[Any]) -> int:
    """The raw checksum of data given as its chunks (see the module docstring)."""
    return combine_checksums([filters.checksum(region) for region in regions])


class _Scratch(threading.local):
    """Per-thread scratch buffers, grown on demand and then reused for every chunk."""

    def __init__(self) -> None:
        self.buffers = [np.empty(0, np.uint8), np.empty(0, np.uint8)]

    def get(self, index: int, size: int) -> np.ndarray:
        if self.buffers[index].size < size:
            self.buffers[index] = np.empty(size, np.uint8)
        return self.buffers[index][:size]


_scratch = _Scratch()


def encode_chunks(
    regions: Sequence[np.ndarray],
    *,
    codec: Codec,
    level: int | None,
    filter_bits: Filter,
    itemsize: int,
    chunk_bytes: int,
    references: Sequence[np.ndarray] | None = None,
) -> EncodedPayload:
    """Encodes raw chunks (flat uint8 arrays) into owned stored chunks.

    ``references`` are the reference's chunks, same lengths, required iff ``XOR_DELTA`` is set.
    """
    stored: list[bytes] = []
    raw_sums: list[int] = []
    stored_sums: list[int] = []
    for index, region in enumerate(regions):
        length = region.size
        raw_sums.append(filters.checksum(region))
        data = region
        if filter_bits & Filter.XOR_DELTA:
            delta = _scratch.get(0, length)
            filters.xor(region, references[index], delta)
            data = delta
        if filter_bits & Filter.SHUFFLE:
            shuffled = _scratch.get(1, length)
            filters.shuffle(data, shuffled, itemsize)
            data = shuffled
        chunk = compress(codec, data, level) if codec is not Codec.NONE else b""
        if codec is Codec.NONE or len(chunk) >= length:
            chunk = data.tobytes()
        stored.append(chunk)
        stored_sums.append(filters.checksum(chunk))
    table = chunk_table([len(chunk) for chunk in stored])
    reference_checksum = tree_checksum(references) if filter_bits & Filter.XOR_DELTA else 0
    return EncodedPayload(
        codec=codec,
        filters=filter_bits,
        chunk_bytes=chunk_bytes,
        chunks=tuple(stored),
        raw_checksum=combine_checksums(raw_sums),
        stored_checksum=combine_checksums(stored_sums, table),
        reference_checksum=reference_checksum,
    )


def plain_payload(regions: Sequence[np.ndarray], *, chunk_bytes: int) -> EncodedPayload:
    """A codec-``none``, unfiltered payload whose chunks are the regions themselves (no copy).

    The caller keeps the regions alive and unchanged while the payload is in use.
    """
    sums = [filters.checksum(region) for region in regions]
    table = chunk_table([region.size for region in regions])
    return EncodedPayload(
        codec=Codec.NONE,
        filters=Filter.NONE,
        chunk_bytes=chunk_bytes,
        chunks=tuple(memoryview(region) for region in regions),
        raw_checksum=combine_checksums(sums),
        stored_checksum=combine_checksums(sums, table),
        reference_checksum=0,
    )


def decode_chunks(
    payload: EncodedPayload,
    outputs: Sequence[np.ndarray],
    *,
    itemsize: int,
    references: Sequence[np.ndarray] | None = None,
) -> None:
    """Decodes every stored chunk into its output region and verifies the raw checksum.

    Stored chunk lengths must already be validated against the output lengths (frame parsing
    does this); a wrong raw checksum raises :class:`CorruptFrameError`.
    """
    raw_sums: list[int] = []
    for index, (chunk, out) in enumerate(zip(payload.chunks, outputs)):
        length = out.size
        data: Any = chunk
        if len(memoryview(chunk)) != length:
            data = decompress(payload.codec, chunk, length)
        if payload.filters & Filter.SHUFFLE:
            filters.unshuffle(data, out, itemsize)
            if payload.filters & Filter.XOR_DELTA:
                filters.xor(out, references[index], out)
        elif payload.filters & Filter.XOR_DELTA:
            filters.xor(data, references[index], out)
        else:
            out[:] = np.frombuffer(data, dtype=np.uint8)
        raw_sums.append(filters.checksum(out))
    found = combine_checksums(raw_sums)
    if found != payload.raw_checksum:
        hint = (" (an XOR-delta frame decoded against a different reference also gives this)"
                if payload.filters & Filter.XOR_DELTA else "")
        raise CorruptFrameError(
            f"raw checksum mismatch: header says {payload.raw_checksum:#018x}, decoded bytes give "
            f"{found:#018x}{hint}; the frame is corrupt, re-fetch it from its source"
        )
