"""Pure numpy twins of the native filters in ``csrc/logging_store_native.c``.

Used when the C extension is not built (no compiler) or when ``LOGGING_STORE_FORCE_FALLBACK=1``.
Every function must give byte-identical output to its native twin and raise ``ValueError`` on
the same misuse; the tests compare both on many sizes. Buffers are any C-contiguous objects
supporting the buffer protocol; outputs are written in place, nothing is returned but the
checksum.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MAX_ITEMSIZE = 64
_MASK64 = (1 << 64) - 1
_CHECKSUM_SEED = 0x9E3779B97F4A7C15
# Rows of four 64-bit words summed per numpy call: large enough to amortise the call overhead,
# small enough that the temporary product stays in cache.
_CHECKSUM_BLOCK_ROWS = 1 << 13
_ROW_WEIGHTS = np.arange(_CHECKSUM_BLOCK_ROWS, dtype=np.uint64)


def _view(buffer: Any, *, writable: bool) -> np.ndarray:
    """A flat uint8 array over ``buffer`` without copying it."""
    memory = memoryview(buffer)
    if not memory.c_contiguous:
        raise ValueError("buffers must be C-contiguous; call .contiguous() or np.ascontiguousarray first")
    if writable and memory.readonly:
        raise ValueError("the output buffer is read-only; pass a bytearray, numpy array or tensor view")
    return np.frombuffer(memory.cast("B"), dtype=np.uint8) if memory.nbytes else np.empty(0, np.uint8)


def _overlaps(x: np.ndarray, y: np.ndarray) -> bool:
    return x.size > 0 and y.size > 0 and bool(np.shares_memory(x, y))


def _check_plane_args(name: str, src: np.ndarray, dst: np.ndarray, itemsize: int) -> None:
    if not 1 <= itemsize <= MAX_ITEMSIZE:
        raise ValueError(f"itemsize must be between 1 and {MAX_ITEMSIZE}, got {itemsize}")
    if src.size != dst.size:
        raise ValueError(f"{name}: dst must be as long as src ({src.size} bytes), got {dst.size} bytes")
    if _overlaps(src, dst):
        raise ValueError(f"{name}: src and dst must not overlap; pass a separate dst buffer")


def shuffle(src: Any, dst: Any, itemsize: int) -> None:
    """Writes byte plane j (byte j of every element) of ``src`` contiguously into ``dst``."""
    s, d = _view(src, writable=False), _view(dst, writable=True)
    _check_plane_args("shuffle", s, d, itemsize)
    n = s.size // itemsize
    body = n * itemsize
    np.copyto(d[:body].reshape(itemsize, n), s[:body].reshape(n, itemsize).T)
    d[body:] = s[body:]


def unshuffle(src: Any, dst: Any, itemsize: int) -> None:
    """Inverse of :func:`shuffle`.

    One strided write per byte plane: the obvious ``reshape(k, -1).T`` copy runs at well under
    1 GB/s because numpy walks the transposed source with a large stride.
    """
    s, d = _view(src, writable=False), _view(dst, writable=True)
    _check_plane_args("unshuffle", s, d, itemsize)
    n = s.size // itemsize
    body = n * itemsize
    planes = s[:body].reshape(itemsize, n)
    elements = d[:body].reshape(n, itemsize)
    for j in range(itemsize):
        elements[:, j] = planes[j]
    d[body:] = s[body:]


def xor(a: Any, b: Any, out: Any) -> None:
    """``out = a ^ b``; ``out`` may be ``a`` or ``b`` itself but must not partially overlap them."""
    x, y, o = _view(a, writable=False), _view(b, writable=False), _view(out, writable=True)
    if not x.size == y.size == o.size:
        raise ValueError(
            f"xor: a, b and out must have the same length, got {x.size}, {y.size} and {o.size} bytes"
        )
    for operand in (x, y):
        if _overlaps(operand, o) and operand.ctypes.data != o.ctypes.data:
            raise ValueError("xor: out must be exactly a, exactly b, or a separate buffer (partial overlap)")
    np.bitwise_xor(x, y, out=o)


def _mix64(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _MASK64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _lane_sums(rows: np.ndarray, first_row: int, total_rows: int) -> tuple[np.ndarray, list[int]]:
    """Per-lane (a, b) contributions of ``rows`` (shape (r, 4), uint64) starting at ``first_row``.

    b_l = sum_r (total_rows - r) * w[r][l] = (total_rows - first_row) * a_l - sum_j j * w[first_row + j][l]
    """
    a = rows.sum(axis=0, dtype=np.uint64)
    weighted = _ROW_WEIGHTS[: rows.shape[0]] @ rows
    scale = total_rows - first_row
    b = [(scale * int(a[lane]) - int(weighted[lane])) & _MASK64 for lane in range(4)]
    return a, b


def checksum(buffer: Any) -> int:
    """The 64-bit checksum defined in ``csrc/logging_store_native.c`` (4 Fletcher lanes, mixed)."""
    data = _view(buffer, writable=False)
    length = data.size
    full_rows = length // 32
    total_rows = full_rows + (1 if length % 32 else 0)
    a = [0, 0, 0, 0]
    b = [0, 0, 0, 0]

    def add(rows: np.ndarray, first_row: int) -> None:
        block_a, block_b = _lane_sums(rows, first_row, total_rows)
        for lane in range(4):
            a[lane] = (a[lane] + int(block_a[lane])) & _MASK64
            b[lane] = (b[lane] + block_b[lane]) & _MASK64

    words = data[: full_rows * 32].view("<u8").reshape(full_rows, 4)
    for first in range(0, full_rows, _CHECKSUM_BLOCK_ROWS):
        add(words[first : first + _CHECKSUM_BLOCK_ROWS], first)
    if length % 32:
        tail = np.zeros(32, dtype=np.uint8)
        tail[: length % 32] = data[full_rows * 32 :]
        add(tail.view("<u8").reshape(1, 4), full_rows)

    h = _mix64(length ^ _CHECKSUM_SEED)
    for value in (*a, *b):
        h = _mix64(h ^ value)
    return h


def checksums(buffer: Any, spans: Any, out: Any) -> None:
    """``out[i]`` = :func:`checksum` of span ``i`` of ``buffer``; ``spans`` holds int64 (offset, length) pairs."""
    data, raw_spans, raw_out = _view(buffer, writable=False), _view(spans, writable=False), _view(out, writable=True)
    if raw_spans.size % 16 or raw_out.size != raw_spans.size // 2:
        raise ValueError(f"checksums: {raw_spans.size} bytes of spans and {raw_out.size} bytes of output do not "
                         "hold the same number of (offset, length) int64 pairs and uint64 results")
    pairs = raw_spans.view(np.int64).reshape(-1, 2).tolist()
    for i, (offset, length) in enumerate(pairs):
        if offset < 0 or length < 0 or offset + length > data.size:
            raise ValueError(f"checksums: span {i} (offset {offset}, length {length}) is outside a buffer of {data.size} bytes")
    sums = raw_out.view(np.uint64)
    for i, (offset, length) in enumerate(pairs):
        sums[i] = checksum(data[offset : offset + length])
