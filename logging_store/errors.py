"""The exceptions of ``logging_store``: catch :class:`LogStoreError` to catch them all."""
from __future__ import annotations


class LogStoreError(Exception):
    """Base class of every error raised on purpose by ``logging_store``."""


class InvalidArgumentError(LogStoreError, ValueError):
    """A configuration value, key, tensor or option is not acceptable."""


class FrameError(LogStoreError):
    """A frame (the on-disk and wire unit) cannot be decoded."""


class TruncatedFrameError(FrameError):
    """The input ends before the frame its header describes."""


class CorruptFrameError(FrameError):
    """A frame's bytes are inconsistent: bad magic, failed checksum, impossible field, bad payload."""


class UnsupportedFrameError(FrameError):
    """A well-formed frame uses a version, dtype, codec or filter this build does not know."""


class ReferenceMismatchError(FrameError):
    """An XOR-delta frame was given no reference, or not the reference it was encoded against."""


class DuplicateKeyError(LogStoreError):
    """``put`` or ``import_`` was given a key the store already holds."""


class MissingKeyError(LogStoreError, KeyError):
    """``get`` was asked for a key the store does not hold (never put, or already dropped)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class StoreClosedError(LogStoreError):
    """The store was used after :meth:`LogStore.close`."""


class SpillError(LogStoreError):
    """Writing to or reading from the spill directory failed (disk full, permissions, ...)."""
