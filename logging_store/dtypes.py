"""Stable one-byte codes for the torch dtypes a frame can carry.

The codes are part of the frame format: never renumber one, only append. Element bytes are
stored as the host holds them (little-endian on every platform torch ships for).
"""
from __future__ import annotations

import torch

from logging_store.errors import InvalidArgumentError, UnsupportedFrameError

_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int8: 5,
    torch.int16: 6,
    torch.int32: 7,
    torch.int64: 8,
    torch.uint8: 9,
    torch.bool: 10,
    torch.complex64: 11,
    torch.complex128: 12,
    torch.float8_e4m3fn: 13,
    torch.float8_e5m2: 14,
    torch.uint16: 15,
    torch.uint32: 16,
    torch.uint64: 17,
}
_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in _CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    """The frame code of ``dtype``; raises if frames cannot carry it."""
    try:
        return _CODES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _CODES)
        raise InvalidArgumentError(
            f"dtype {dtype} cannot be stored; supported dtypes: {supported}. "
            "Convert the tensor (e.g. .to(torch.float32)) before storing it."
        ) from None


def dtype_from_code(code: int) -> torch.dtype:
    """The dtype of frame code ``code``; raises :class:`UnsupportedFrameError` if unknown."""
    try:
        return _DTYPES[code]
    except KeyError:
        raise UnsupportedFrameError(
            f"frame has dtype code {code}, which this build does not know (known: 1-{max(_DTYPES)}); "
            "the frame was written by a newer logging_store or is corrupt"
        ) from None
