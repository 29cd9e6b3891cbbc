"""General-purpose codecs applied to one chunk at a time: ``none``, ``lz4`` and ``zstd``.

Chunks (1 MiB by default) keep codec calls in cache and their output allocations small: one-shot
64 MiB calls measured 3-8x slower here. zstd contexts are not thread-safe (sharing one crashed
the process), so each thread gets its own compressor and decompressor.
"""
from __future__ import annotations

import enum
import threading
from typing import Any

import lz4.block
import zstandard

from logging_store.errors import CorruptFrameError, InvalidArgumentError, UnsupportedFrameError


class Codec(enum.IntEnum):
    """Codec codes as written in frames (never renumber)."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2


ZSTD_LEVELS = range(-7, 23)
LZ4_LEVELS = range(1, 13)  # lz4 high-compression levels; None selects the fast default mode

_thread_state = threading.local()


def parse_codec(name: str | Codec) -> Codec:
    """``"lz4"`` -> ``Codec.LZ4``; raises :class:`InvalidArgumentError` for unknown names."""
    if isinstance(name, Codec):
        return name
    try:
        return Codec[str(name).upper()]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown codec {name!r}; expected one of: none, lz4, zstd"
        ) from None


def check_level(codec: Codec, level: int | None) -> None:
    """Rejects a level the codec does not accept, naming the valid range."""
    if level is None:
        return
    valid = {Codec.ZSTD: ZSTD_LEVELS, Codec.LZ4: LZ4_LEVELS}.get(codec)
    if valid is None or level not in valid:
        expected = f"{valid.start}..{valid.stop - 1} or None" if valid else "None"
        raise InvalidArgumentError(f"level {level!r} is not valid for codec {codec.name.lower()}; expected {expected}")


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_thread_state, "compressors", None)
    if cache is None:
        cache = _thread_state.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_thread_state, "decompressor", None)
    if decompressor is None:
        decompressor = _thread_state.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def compress(codec: Codec, data: Any, level: int | None) -> bytes:
    """Compresses one chunk (any contiguous buffer) and returns the compressed bytes."""
    if codec is Codec.LZ4:
        if level is None:
            return lz4.block.compress(data, store_size=False)
        return lz4.block.compress(data, mode="high_compression", compression=level, store_size=False)
    if codec is Codec.ZSTD:
        return _zstd_compressor(1 if level is None else level).compress(data)
    raise InvalidArgumentError(f"codec {codec.name.lower()} does not compress")


def decompress(codec: Codec, data: Any, raw_length: int) -> bytes:
    """Decompresses one chunk that must expand to exactly ``raw_length`` bytes.

    Never allocates more than ``raw_length``: zstd's declared content size is checked first, and
    lz4 is given the exact output size. Any codec failure becomes :class:`CorruptFrameError`.
    """
    try:
        if codec is Codec.LZ4:
            out = lz4.block.decompress(data, uncompressed_size=raw_length)
        elif codec is Codec.ZSTD:
            declared = zstandard.frame_content_size(data)
            if declared != raw_length:
                raise CorruptFrameError(
                    f"zstd chunk declares {declared} decompressed bytes, the frame header expects {raw_length}"
                )
            out = _zstd_decompressor().decompress(data, max_output_size=raw_length, allow_extra_data=False)
        else:
            raise UnsupportedFrameError(f"codec {codec!r} has no decompressor")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as error:
        raise CorruptFrameError(f"{codec.name.lower()} could not decode a chunk: {error}") from None
    if len(out) != raw_length:
        raise CorruptFrameError(
            f"{codec.name.lower()} chunk decoded to {len(out)} bytes, the frame header expects {raw_length}"
        )
    return out
