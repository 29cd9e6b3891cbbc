"""Byte filters (shuffle, un-shuffle, XOR-delta) and the checksum, native when available.

The C extension ``logging_store._native`` runs these at memory speed with the GIL released; the
numpy fallback in ``_fallback`` gives byte-identical output. Set ``LOGGING_STORE_FORCE_FALLBACK=1``
before importing ``logging_store`` to force the fallback (tests use it to exercise that path).

All functions take C-contiguous buffer-protocol objects (bytes, bytearray, memoryview, numpy
arrays; for a torch tensor pass ``t.view(torch.uint8).numpy()``) and write into the caller's
output buffer, so calling them allocates nothing.
"""
from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any, Callable

from logging_store import _fallback

FORCE_FALLBACK_ENV = "LOGGING_STORE_FORCE_FALLBACK"

_log = logging.getLogger(__name__)


def _select_backend() -> tuple[ModuleType, str]:
    if os.environ.get(FORCE_FALLBACK_ENV, "") not in ("", "0"):
        _log.debug("%s is set: using the numpy filters", FORCE_FALLBACK_ENV)
        return _fallback, "numpy"
    try:
        from logging_store import _native
    except ImportError:
        _log.info("logging_store._native is not built; using the (slower) numpy filters. "
                  "Build it with `python setup.py build_ext --inplace`.")
        return _fallback, "numpy"
    return _native, "native"


_backend, BACKEND = _select_backend()
"""``"native"`` or ``"numpy"``: which implementation this process uses."""

shuffle: Callable[[Any, Any, int], None] = _backend.shuffle
"""``shuffle(src, dst, itemsize)``: dst holds byte 0 of every element, then byte 1, ...
A trailing partial element is copied unchanged. src and dst must not overlap."""

unshuffle: Callable[[Any, Any, int], None] = _backend.unshuffle
"""``unshuffle(src, dst, itemsize)``: inverse of :func:`shuffle`."""

xor: Callable[[Any, Any, Any], None] = _backend.xor
"""``xor(a, b, out)``: ``out = a ^ b``; ``out`` may be ``a`` or ``b`` (in place)."""

checksum: Callable[[Any], int] = _backend.checksum
"""``checksum(buf) -> int``: 64-bit content checksum (4 Fletcher lanes + SplitMix64 mixing)."""

checksums: Callable[[Any, Any, Any], None] = _backend.checksums
"""``checksums(buf, spans, out)``: ``out[i]`` (uint64) = :func:`checksum` of span ``i`` of ``buf``,
``spans`` int64 (offset, length) pairs; one call, and one GIL release, for many tensors."""
