"""The frame: one tensor as bytes, the same on disk and on the wire. No pickle anywhere.

Layout (little-endian)::

    offset  size      field
    0       4         magic b"LSFR"
    4       2         version (1)
    6       1         dtype code (logging_store.dtypes)
    7       1         codec (0 none, 1 lz4, 2 zstd)
    8       1         filters (bit 0 byte-shuffle, bit 1 XOR-delta)
    9       1         ndim (<= 32)
    10      1         log2 of the chunk size (12..30)
    11      1         tag length (<= 255)
    12      4         reserved, must be 0
    16      8         raw length (bytes of the tensor)
    24      8         stored length (bytes of the payload that follows the header)
    32      8         raw checksum        (tree checksum of the tensor bytes, see chunks.py)
    40      8         stored checksum     (over the chunk table and the stored chunks)
    48      8         reference checksum  (XOR-delta frames: tree checksum of the reference; else 0)
    56      8*ndim    shape, one uint64 per dimension
    ...     tag len   tag: opaque bytes for the caller (the store keeps its key here)
    ...     8         header checksum of every header byte before it
    payload:          chunk table (uint32 stored length per chunk), then the stored chunks

Every field is validated before anything is allocated: the tensor size must match the raw length,
which must be within ``max_raw_bytes``; the stored length must match the chunk table and be
present in the input. A decoder therefore never allocates more than the raw length it accepted.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch

from logging_store import filters
from logging_store.chunks import (
    CHUNK_TABLE_ENTRY,
    EncodedPayload,
    Filter,
    chunk_views,
    combine_checksums,
    decode_chunks,
    encode_chunks,
    tree_checksum,
)
from logging_store.codecs import Codec, check_level, parse_codec
from logging_store.dtypes import dtype_code, dtype_from_code
from logging_store.errors import (
    CorruptFrameError,
    InvalidArgumentError,
    ReferenceMismatchError,
    TruncatedFrameError,
    UnsupportedFrameError,
)

MAGIC = b"LSFR"
VERSION = 1
MAX_NDIM = 32
MAX_TAG_BYTES = 255
MIN_CHUNK_LOG2, MAX_CHUNK_LOG2 = 12, 30
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_RAW_BYTES = 16 << 30
"""Largest tensor a decoder accepts unless told otherwise: a hostile header cannot make it
allocate more. Pass ``max_raw_bytes`` to decode bigger frames."""

_FIXED = struct.Struct("<4sHBBBBBBIQQQQQ")
FIXED_HEADER_BYTES = _FIXED.size  # 56
_CHECKSUM = struct.Struct("<Q")
_READ_STEP = 16 << 20  # file reads grow by at most this much, so a lying length costs nothing


@dataclass(frozen=True)
class FrameHeader:
    """A validated frame header."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: Codec
    filters: Filter
    chunk_bytes: int
    raw_length: int
    stored_length: int
    raw_checksum: int
    stored_checksum: int
    reference_checksum: int
    tag: bytes

    @property
    def header_length(self) -> int:
        return FIXED_HEADER_BYTES + 8 * len(self.shape) + len(self.tag) + _CHECKSUM.size

    @property
    def frame_length(self) -> int:
        return self.header_length + self.stored_length

    @property
    def chunk_count(self) -> int:
        return -(-self.raw_length // self.chunk_bytes)

    def raw_chunk_length(self, index: int) -> int:
        return min(self.chunk_bytes, self.raw_length - index * self.chunk_bytes)

    def pack(self) -> bytes:
        """The header bytes, header checksum included."""
        body = _FIXED.pack(
            MAGIC, VERSION, dtype_code(self.dtype), int(self.codec), int(self.filters), len(self.shape),
            self.chunk_bytes.bit_length() - 1, len(self.tag), 0, self.raw_length, self.stored_length,
            self.raw_checksum, self.stored_checksum, self.reference_checksum,
        ) + struct.pack(f"<{len(self.shape)}Q", *self.shape) + self.tag
        return body + _CHECKSUM.pack(filters.checksum(body))


@dataclass(frozen=True)
class Frame:
    """A parsed frame whose header and stored checksum are verified; chunks are views into the input."""

    header: FrameHeader
    payload: EncodedPayload


def header_for(
    dtype: torch.dtype, shape: Sequence[int], payload: EncodedPayload, *, tag: bytes = b""
) -> FrameHeader:
    """The header describing ``payload`` as a tensor of ``dtype`` and ``shape``."""
    if len(tag) > MAX_TAG_BYTES:
        raise InvalidArgumentError(f"tag is {len(tag)} bytes; at most {MAX_TAG_BYTES} fit in a frame")
    if len(shape) > MAX_NDIM:
        raise InvalidArgumentError(f"tensor has {len(shape)} dimensions; frames hold at most {MAX_NDIM}")
    raw_length = math.prod(shape) * dtype.itemsize
    return FrameHeader(
        dtype=dtype, shape=tuple(int(d) for d in shape), codec=payload.codec, filters=payload.filters,
        chunk_bytes=payload.chunk_bytes, raw_length=raw_length, stored_length=payload.stored_length,
        raw_checksum=payload.raw_checksum, stored_checksum=payload.stored_checksum,
        reference_checksum=payload.reference_checksum, tag=tag,
    )


def frame_parts(header: FrameHeader, payload: EncodedPayload) -> list[Any]:
    """Header, chunk table and chunks as a list of buffers, for ``b"".join`` or ``writelines``."""
    return [header.pack(), payload.table(), *payload.chunks]


# ------------------------------------------------------------------------------------ encoding


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes (zero-copy, any dtype)."""
    if tensor.numel() == 0:
        return np.empty(0, np.uint8)
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    return tensor.view(torch.uint8).numpy().reshape(-1)


def output_tensor(dtype: torch.dtype, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked to be a contiguous CPU tensor of ``dtype`` and ``shape``, or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
        raise InvalidArgumentError(
            f"out must be a contiguous CPU tensor of {dtype} {shape}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    return out


def host_tensor(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` detached, with lazy conjugation/negation resolved, on the host and contiguous."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise InvalidArgumentError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}; call .to_dense()")
    return tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous()


def encode(
    tensor: torch.Tensor,
    *,
    codec: str | Codec = "lz4",
    level: int | None = None,
    shuffle: bool = True,
    reference: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tag: bytes = b"",
) -> bytes:
    """Encodes ``tensor`` as one frame.

    ``shuffle`` groups equal-significance bytes (sign/exponent bytes compress well; ignored for
    1-byte dtypes);
    ``reference`` (same dtype and shape) enables XOR-delta, for consecutive weight snapshots that
    differ in few bits. Decoding such a frame requires the same reference.
    """
    codec = parse_codec(codec)
    check_level(codec, level)
    check_chunk_bytes(chunk_bytes)
    source = host_tensor(tensor, "tensor")
    dtype_code(source.dtype)  # fail before any work for a dtype frames cannot carry
    filter_bits = Filter.SHUFFLE if shuffle and source.element_size() > 1 else Filter.NONE
    references = None
    if reference is not None:
        ref = host_tensor(reference, "reference")
        if ref.dtype != source.dtype or ref.shape != source.shape:
            raise InvalidArgumentError(
                f"reference must match the tensor: expected {source.dtype} {tuple(source.shape)}, "
                f"got {ref.dtype} {tuple(ref.shape)}"
            )
        filter_bits |= Filter.XOR_DELTA
        references = chunk_views(tensor_bytes(ref), chunk_bytes)
    payload = encode_chunks(
        chunk_views(tensor_bytes(source), chunk_bytes), codec=codec, level=level, filter_bits=filter_bits,
        itemsize=source.element_size(), chunk_bytes=chunk_bytes, references=references,
    )
    return b"".join(frame_parts(header_for(source.dtype, source.shape, payload, tag=tag), payload))


def check_chunk_bytes(chunk_bytes: int) -> None:
    if (not isinstance(chunk_bytes, int) or chunk_bytes & (chunk_bytes - 1)
            or not (1 << MIN_CHUNK_LOG2) <= chunk_bytes <= (1 << MAX_CHUNK_LOG2)):
        raise InvalidArgumentError(
            f"chunk_bytes must be a power of two between {1 << MIN_CHUNK_LOG2} and {1 << MAX_CHUNK_LOG2}, "
            f"got {chunk_bytes!r}"
        )


# ------------------------------------------------------------------------------------ parsing


def _corrupt(what: str) -> CorruptFrameError:
    return CorruptFrameError(f"corrupt frame: {what}; the bytes were damaged or are not a logging_store frame")


def _need(available: int, needed: int, what: str) -> None:
    if available < needed:
        raise TruncatedFrameError(
            f"truncated frame: {what} needs {needed} bytes, only {available} are present; "
            "the stream was cut short, fetch or read it again"
        )


def header_length_of(prefix: memoryview) -> int:
    """Total header length announced by a fixed-size prefix (after magic, version and bounds checks)."""
    start = bytes(prefix[: len(MAGIC)])
    if start != MAGIC[: len(start)]:
        raise _corrupt(f"input starts with {start!r}, expected magic {MAGIC!r}")
    _need(len(prefix), FIXED_HEADER_BYTES, "the fixed header")
    _, version, _, _, _, ndim, _, tag_len, *_ = _FIXED.unpack_from(prefix)
    if version != VERSION:
        raise UnsupportedFrameError(
            f"frame version {version} is not supported (this build reads version {VERSION}); "
            "upgrade logging_store or re-export with this version"
        )
    if ndim > MAX_NDIM:
        raise _corrupt(f"ndim is {ndim}, at most {MAX_NDIM} is allowed")
    return FIXED_HEADER_BYTES + 8 * ndim + tag_len + _CHECKSUM.size


def parse_header(data: Any, *, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> FrameHeader:
    """Reads and validates the header at the start of ``data`` (the payload need not be present)."""
    view = memoryview(data).cast("B")
    length = header_length_of(view[:FIXED_HEADER_BYTES])
    _need(len(view), length, "the header")
    (_, _, code, codec_code, filter_code, ndim, chunk_log2, tag_len, reserved, raw_length, stored_length,
     raw_checksum, stored_checksum, reference_checksum) = _FIXED.unpack_from(view)
    body_end = length - _CHECKSUM.size
    (expected,) = _CHECKSUM.unpack_from(view, body_end)
    found = filters.checksum(view[:body_end])
    if found != expected:
        raise _corrupt(f"header checksum is {found:#018x}, the header records {expected:#018x}")
    if reserved:
        raise _corrupt(f"reserved field is {reserved}, expected 0")
    dtype = dtype_from_code(code)
    try:
        codec = Codec(codec_code)
    except ValueError:
        raise UnsupportedFrameError(f"frame uses codec code {codec_code}, this build knows 0 (none), 1 (lz4), 2 (zstd)") from None
    if filter_code & ~int(Filter.SHUFFLE | Filter.XOR_DELTA):
        raise UnsupportedFrameError(f"frame uses filter bits {filter_code:#04x}, this build knows 0x01 and 0x02")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise _corrupt(f"chunk size is 2**{chunk_log2}, expected 2**{MIN_CHUNK_LOG2}..2**{MAX_CHUNK_LOG2}")
    shape = struct.unpack_from(f"<{ndim}Q", view, FIXED_HEADER_BYTES)
    tag = bytes(view[FIXED_HEADER_BYTES + 8 * ndim : body_end])
    if raw_length > max_raw_bytes:
        raise CorruptFrameError(
            f"frame holds {raw_length} raw bytes, more than max_raw_bytes={max_raw_bytes}; "
            "pass a larger max_raw_bytes if this frame is trusted"
        )
    if math.prod(d for d in shape if d) * dtype.itemsize > max_raw_bytes:
        raise _corrupt(f"shape {tuple(shape)} has dimensions larger than any tensor within max_raw_bytes")
    if math.prod(shape) * dtype.itemsize != raw_length:
        raise _corrupt(f"shape {tuple(shape)} of {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, "
                       f"raw length is {raw_length}")
    header = FrameHeader(
        dtype=dtype, shape=tuple(shape), codec=codec, filters=Filter(filter_code), chunk_bytes=1 << chunk_log2,
        raw_length=raw_length, stored_length=stored_length, raw_checksum=raw_checksum,
        stored_checksum=stored_checksum, reference_checksum=reference_checksum, tag=tag,
    )
    table_bytes = CHUNK_TABLE_ENTRY * header.chunk_count
    if not table_bytes <= stored_length <= table_bytes + raw_length:
        raise _corrupt(f"stored length {stored_length} is outside {table_bytes}..{table_bytes + raw_length} "
                       f"for {header.chunk_count} chunks of at most {raw_length} raw bytes")
    return header


def parse_frame(data: Any, *, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> Frame:
    """Validates the frame at the start of ``data`` (header, chunk table, stored checksum).

    Returns a :class:`Frame` whose chunks are views into ``data`` (nothing is copied); trailing
    bytes after the frame are left to the caller.
    """
    view = memoryview(data).cast("B")
    header = parse_header(view, max_raw_bytes=max_raw_bytes)
    start = header.header_length
    _need(len(view), header.frame_length, "the frame (header plus payload)")
    n = header.chunk_count
    table = view[start : start + CHUNK_TABLE_ENTRY * n]
    lengths = struct.unpack(f"<{n}I", table)
    if sum(lengths) != header.stored_length - len(table):
        raise _corrupt(f"chunk table sums to {sum(lengths)} bytes, the header says {header.stored_length - len(table)}")
    chunks = []
    offset = start + len(table)
    for index, stored in enumerate(lengths):
        raw = header.raw_chunk_length(index)
        if not 1 <= stored <= raw or (header.codec is Codec.NONE and stored != raw):
            raise _corrupt(f"chunk {index} stores {stored} bytes for {raw} raw bytes with codec {header.codec.name.lower()}")
        chunks.append(view[offset : offset + stored])
        offset += stored
    found = combine_checksums([filters.checksum(chunk) for chunk in chunks], bytes(table))
    if found != header.stored_checksum:
        raise _corrupt(f"stored checksum is {found:#018x}, the header records {header.stored_checksum:#018x}")
    payload = EncodedPayload(
        codec=header.codec, filters=header.filters, chunk_bytes=header.chunk_bytes, chunks=tuple(chunks),
        raw_checksum=header.raw_checksum, stored_checksum=header.stored_checksum,
        reference_checksum=header.reference_checksum,
    )
    return Frame(header=header, payload=payload)


def decode_frame(frame: Frame, *, reference: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decodes a parsed frame into a new tensor (or into ``out``: contiguous, same dtype and shape)."""
    header = frame.header
    references = None
    if header.filters & Filter.XOR_DELTA:
        if reference is None:
            raise ReferenceMismatchError(
                "this frame is an XOR-delta against a reference tensor; pass reference= (the tensor given to encode)"
            )
        ref = host_tensor(reference, "reference")
        if ref.dtype != header.dtype or tuple(ref.shape) != header.shape:
            raise ReferenceMismatchError(
                f"reference must be {header.dtype} {header.shape} like the frame, got {ref.dtype} {tuple(ref.shape)}"
            )
        references = chunk_views(tensor_bytes(ref), header.chunk_bytes)
        found = tree_checksum(references)
        if found != header.reference_checksum:
            raise ReferenceMismatchError(
                f"reference checksum is {found:#018x}, the frame was encoded against {header.reference_checksum:#018x}; "
                "pass the same reference tensor that encode() was given"
            )
    out = output_tensor(header.dtype, header.shape, out)
    decode_chunks(frame.payload, chunk_views(tensor_bytes(out), header.chunk_bytes),
                  itemsize=header.dtype.itemsize, references=references)
    return out


def decode(
    data: Any, *, reference: torch.Tensor | None = None, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES
) -> torch.Tensor:
    """Decodes a buffer holding exactly one frame; the result is bit-identical to what was encoded."""
    frame = parse_frame(data, max_raw_bytes=max_raw_bytes)
    trailing = len(memoryview(data).cast("B")) - frame.header.frame_length
    if trailing:
        raise _corrupt(f"{trailing} bytes follow the frame; use iter_frames() for a stream of frames")
    return decode_frame(frame, reference=reference)


def iter_frames(data: Any, *, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> Iterator[Frame]:
    """Parses a buffer of concatenated frames (an export stream), one validated frame at a time."""
    view = memoryview(data).cast("B")
    offset = 0
    while offset < len(view):
        frame = parse_frame(view[offset:], max_raw_bytes=max_raw_bytes)
        offset += frame.header.frame_length
        yield frame


def _read_exactly(file: BinaryIO, size: int, what: str, have: int = 0) -> bytes:
    """Reads ``size`` bytes in bounded steps, so a lying header cannot force a huge allocation."""
    parts = []
    remaining = size
    while remaining:
        piece = file.read(min(remaining, _READ_STEP))
        if not piece:
            _need(have + size - remaining, have + size, what)
        parts.append(piece)
        remaining -= len(piece)
    return b"".join(parts)


def read_frames(file: BinaryIO, *, max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> Iterator[Frame]:
    """Parses frames from a binary file object until end of file."""
    while True:
        fixed = file.read(FIXED_HEADER_BYTES)
        if not fixed:
            return
        fixed += _read_exactly(file, FIXED_HEADER_BYTES - len(fixed), "the fixed header", len(fixed))
        header_length = header_length_of(memoryview(fixed))
        head = fixed + _read_exactly(file, header_length - FIXED_HEADER_BYTES, "the header", FIXED_HEADER_BYTES)
        header = parse_header(head, max_raw_bytes=max_raw_bytes)
        body = _read_exactly(file, header.stored_length, "the frame (header plus payload)", header_length)
        yield parse_frame(head + body, max_raw_bytes=max_raw_bytes)
