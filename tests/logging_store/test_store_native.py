"""The native filters and the numpy fallback agree byte for byte; the env var forces the fallback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logging_store import _fallback, filters
from logging_store import _native  # a missing build must fail these tests, not skip them

REPO = Path(__file__).resolve().parents[2]
ITEMSIZES = [1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 32, 64]
SIZES = list(range(0, 70)) + [127, 128, 129, 255, 256, 1000, 4095, 4096, 4097, 65536 + 17, (1 << 20) + 3]


def _data(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _both(function: str, *inputs: np.ndarray, itemsize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    outputs = []
    for backend in (_native, _fallback):
        out = np.full(inputs[0].size, 0xA5, np.uint8)
        args = (*inputs, out) + ((itemsize,) if itemsize is not None else ())
        getattr(backend, function)(*args)
        outputs.append(out)
    return outputs[0], outputs[1]


def test_native_extension_is_the_default_backend() -> None:
    assert filters.BACKEND == "native", "build it: python setup.py build_ext --inplace"
    assert filters.shuffle is _native.shuffle


@pytest.mark.parametrize("itemsize", ITEMSIZES)
def test_shuffle_and_unshuffle_match_fallback_on_all_sizes(itemsize: int) -> None:
    for size in SIZES:
        data = _data(size, seed=size * 131 + itemsize)
        native, fallback = _both("shuffle", data, itemsize=itemsize)
        assert native.tobytes() == fallback.tobytes(), (size, itemsize)
        back_native, back_fallback = _both("unshuffle", native, itemsize=itemsize)
        assert back_native.tobytes() == back_fallback.tobytes() == data.tobytes(), (size, itemsize)


def test_shuffle_groups_byte_planes() -> None:
    data = np.arange(12, dtype=np.uint8)  # three 4-byte elements 0..3, 4..7, 8..11
    out = np.empty_like(data)
    _native.shuffle(data, out, 4)
    assert out.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    odd = np.arange(7, dtype=np.uint8)  # trailing partial element is copied unchanged
    out = np.empty_like(odd)
    _native.shuffle(odd, out, 2)
    assert out.tolist() == [0, 2, 4, 1, 3, 5, 6]


@pytest.mark.parametrize("size", SIZES)
def test_xor_and_checksum_match_fallback(size: int) -> None:
    a, b = _data(size, seed=size), _data(size, seed=size + 7)
    native, fallback = _both("xor", a, b)
    assert native.tobytes() == fallback.tobytes() == (a ^ b).tobytes()
    assert _native.checksum(a) == _fallback.checksum(a)
    assert _native.checksum(memoryview(a.tobytes())) == _native.checksum(a)


def test_xor_in_place_on_either_operand() -> None:
    for backend in (_native, _fallback):
        a, b = _data(1001, 1), _data(1001, 2)
        expected = a ^ b
        backend.xor(a, b, a)
        assert a.tobytes() == expected.tobytes()
        a2 = _data(1001, 1)
        backend.xor(a2, b, b)
        assert b.tobytes() == expected.tobytes()


def test_checksum_known_answers() -> None:
    # Pins the definition: frames written today must verify with any later build.
    for backend in (_native, _fallback):
        assert backend.checksum(b"") == 0xC50DD9468318F0A0
        assert backend.checksum(bytes(range(256)) * 3 + b"xyz") == 0x7218E8F9101197B9


@pytest.mark.parametrize("backend", [_native, _fallback], ids=["native", "numpy"])
def test_checksums_of_spans_equal_one_checksum_per_span(backend) -> None:
    data = np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8)
    spans = np.array([(0, 0), (0, 5000), (3, 61), (64, 4096), (4999, 1), (5000, 0)], dtype=np.int64)
    out = np.zeros(len(spans), np.uint64)
    backend.checksums(data, spans, out)
    assert out.tolist() == [_native.checksum(data[o : o + n]) for o, n in spans.tolist()]


@pytest.mark.parametrize("backend", [_native, _fallback], ids=["native", "numpy"])
def test_checksums_refuse_spans_outside_the_buffer_or_a_short_output(backend) -> None:
    data = np.zeros(100, np.uint8)
    for bad in [(90, 11), (-1, 5), (101, 0), (0, -1)]:
        with pytest.raises(ValueError, match="outside a buffer of 100 bytes"):
            backend.checksums(data, np.array([bad], np.int64), np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match="same number"):
        backend.checksums(data, np.array([(0, 1), (1, 1)], np.int64), np.zeros(1, np.uint64))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), itemsize=st.sampled_from(ITEMSIZES), position=st.integers(0, 2999),
       mask=st.integers(1, 255))
def test_property_filters_agree_and_checksum_sees_any_byte_change(data: bytes, itemsize: int, position: int,
                                                                   mask: int) -> None:
    array = np.frombuffer(data, np.uint8).copy()
    for function in ("shuffle", "unshuffle"):
        native, fallback = _both(function, array, itemsize=itemsize)
        assert native.tobytes() == fallback.tobytes()
    assert _native.checksum(array) == _fallback.checksum(array)
    if array.size:
        changed = array.copy()
        changed[position % array.size] ^= mask
        assert _native.checksum(changed) != _native.checksum(array)


@pytest.mark.parametrize("backend", [_native, _fallback], ids=["native", "numpy"])
def test_misuse_raises_value_error(backend) -> None:
    a = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="itemsize"):
        backend.shuffle(a, np.zeros(16, np.uint8), 0)
    with pytest.raises(ValueError, match="itemsize"):
        backend.unshuffle(a, np.zeros(16, np.uint8), 65)
    with pytest.raises(ValueError, match="as long as"):
        backend.shuffle(a, np.zeros(15, np.uint8), 2)
    with pytest.raises(ValueError, match="overlap"):
        backend.shuffle(a, a, 2)
    with pytest.raises(ValueError, match="same length"):
        backend.xor(a, np.zeros(8, np.uint8), np.zeros(16, np.uint8))
    with pytest.raises(ValueError, match="partial overlap"):
        backend.xor(a[:8], a[4:12], a[2:10])
    with pytest.raises((ValueError, TypeError, BufferError)):
        backend.shuffle(a, bytes(16), 2)  # read-only destination


_SUBPROCESS_FRAMES = """
import sys, torch
import logging_store as ls
torch.manual_seed(0)
x = torch.randn(300, 77).bfloat16()
ref = (x.float() + 0.01).bfloat16()
frames = [ls.encode(x, codec=c, shuffle=s, chunk_bytes=4096) for c in ("none", "lz4", "zstd") for s in (False, True)]
frames.append(ls.encode(x, codec="zstd", reference=ref, chunk_bytes=4096))
assert torch.equal(ls.decode(frames[-1], reference=ref), x)
sys.stdout.buffer.write(ls.BACKEND.encode() + b"\\n" + b"".join(frames))
"""


def test_forced_fallback_writes_byte_identical_frames() -> None:
    import torch

    import logging_store as ls

    env = dict(os.environ, LOGGING_STORE_FORCE_FALLBACK="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS_FRAMES], capture_output=True, env=env, cwd=REPO,
                            check=True, timeout=120)
    backend, frames = result.stdout.split(b"\n", 1)
    assert backend == b"numpy"
    torch.manual_seed(0)
    x = torch.randn(300, 77).bfloat16()
    ref = (x.float() + 0.01).bfloat16()
    expected = [ls.encode(x, codec=c, shuffle=s, chunk_bytes=4096) for c in ("none", "lz4", "zstd") for s in (False, True)]
    expected.append(ls.encode(x, codec="zstd", reference=ref, chunk_bytes=4096))
    assert frames == b"".join(expected)
