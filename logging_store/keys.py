"""The key of a log entry, and its compact encoding in a frame's tag."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from logging_store.errors import CorruptFrameError, InvalidArgumentError

_INT64 = (-(1 << 63), (1 << 63) - 1)
_INT32 = (-(1 << 31), (1 << 31) - 1)
_TAG = struct.Struct("<qii")
MAX_KIND_BYTES = 64


@dataclass(frozen=True, order=True)
class LogKey:
    """What one logged tensor is: the step, the micro-batch, what was sent, and to whom.

    ``kind`` is a short label such as ``"activation"`` or ``"gradient"``; ``peer`` is the stage
    (or rank) on the other side of the boundary. Keys sort by iteration first, which is what
    range queries and ``drop_before`` use.
    """

    iteration: int
    micro_batch: int
    kind: str
    peer: int

    def __post_init__(self) -> None:
        for name, (low, high) in (("iteration", _INT64), ("micro_batch", _INT32), ("peer", _INT32)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise InvalidArgumentError(f"LogKey.{name} must be an int in {low}..{high}, got {value!r}")
        if not isinstance(self.kind, str) or not 1 <= len(self.kind.encode()) <= MAX_KIND_BYTES:
            raise InvalidArgumentError(
                f"LogKey.kind must be a non-empty str of at most {MAX_KIND_BYTES} UTF-8 bytes, got {self.kind!r}"
            )

    def to_tag(self) -> bytes:
        """The key as frame tag bytes."""
        return _TAG.pack(self.iteration, self.micro_batch, self.peer) + self.kind.encode()

    @classmethod
    def from_tag(cls, tag: bytes) -> "LogKey":
        """Inverse of :meth:`to_tag`; a frame without a valid key tag raises :class:`CorruptFrameError`."""
        if len(tag) <= _TAG.size:
            raise CorruptFrameError(
                f"frame tag is {len(tag)} bytes, a log key needs more than {_TAG.size}; "
                "this frame was not exported by a LogStore"
            )
        iteration, micro_batch, peer = _TAG.unpack_from(tag)
        try:
            return cls(iteration, micro_batch, tag[_TAG.size :].decode(), peer)
        except (UnicodeDecodeError, InvalidArgumentError) as error:
            raise CorruptFrameError(f"frame tag does not hold a valid log key: {error}") from None
