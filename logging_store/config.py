"""The configuration of a :class:`~logging_store.LogStore`, validated once at construction."""
from __future__ import annotations

import os
from dataclasses import dataclass

from logging_store.codecs import Codec, check_level, parse_codec
from logging_store.errors import InvalidArgumentError
from logging_store.frame import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_RAW_BYTES, check_chunk_bytes


@dataclass(frozen=True, kw_only=True)
class LogStoreConfig:
    """How a store encodes, where it spills, and how much memory it prepares.

    Attributes:
        codec: ``"none"``, ``"lz4"`` (default: fast, skips incompressible data) or ``"zstd"``.
        level: codec level; zstd -7..22 (None = 1), lz4 1..12 selects its slow high-compression
            mode (None = fast mode).
        shuffle: byte-shuffle by element size before compressing (bf16/fp16/fp32 compress better).
        workers: background compression threads; 0 keeps every entry raw until it spills.
        chunk_bytes: unit of compression and of pool memory (a power of two, default 1 MiB).
        budget_bytes: in-memory bytes (raw entries at full size, encoded ones at stored size)
            beyond which the oldest entries spill to disk; None never spills.
        spill_dir: parent directory for spill segments (default: the system temp directory).
        spill_watermark: fraction of the budget above which workers start spilling in the
            background, so that ``put`` rarely has to spill itself.
        reserve_bytes: pool memory allocated and page-faulted when the store opens.
        headroom_bytes: free pool memory the workers keep ready ahead of ``put``.
        max_raw_bytes: largest entry ``import_`` and spill reads accept (bounds allocations).
    """

    codec: str = "lz4"
    level: int | None = None
    shuffle: bool = True
    workers: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    budget_bytes: int | None = None
    spill_dir: str | os.PathLike[str] | None = None
    spill_watermark: float = 0.75
    reserve_bytes: int = 32 << 20
    headroom_bytes: int = 16 << 20
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES

    def __post_init__(self) -> None:
        check_level(self.codec_id, self.level)
        check_chunk_bytes(self.chunk_bytes)
        for name in ("workers", "reserve_bytes", "headroom_bytes"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                     f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        _require(self.budget_bytes is None or (isinstance(self.budget_bytes, int) and self.budget_bytes >= 0),
                 f"budget_bytes must be None or an int >= 0, got {self.budget_bytes!r}")
        _require(0.0 < self.spill_watermark <= 1.0, f"spill_watermark must be in (0, 1], got {self.spill_watermark!r}")
        _require(isinstance(self.max_raw_bytes, int) and self.max_raw_bytes > 0,
                 f"max_raw_bytes must be a positive int, got {self.max_raw_bytes!r}")

    @property
    def codec_id(self) -> Codec:
        return parse_codec(self.codec)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(message)
