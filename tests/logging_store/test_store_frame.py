"""Frames: exact round trips, and every truncation, byte flip or hostile header is rejected cleanly."""
from __future__ import annotations

import io
import struct

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from logstore_helpers import DTYPES, SHAPES, random_tensor, same_bits, smooth_tensor

import logging_store as ls
from logging_store import filters
from logging_store.chunks import chunk_table, combine_checksums
from logging_store.frame import FIXED_HEADER_BYTES, parse_frame

CODECS = ["none", "lz4", "zstd"]


def _small_frames() -> dict[str, bytes]:
    """Multi-chunk frames (4 KiB chunks) covering every codec and filter combination."""
    x = smooth_tensor(torch.bfloat16, (3000,), seed=1)
    ref = smooth_tensor(torch.bfloat16, (3000,), seed=2)
    frames = {f"{codec}-shuffle{shuffle}": ls.encode(x, codec=codec, shuffle=shuffle, chunk_bytes=4096)
              for codec in CODECS for shuffle in (False, True)}
    frames["zstd-delta"] = ls.encode(x, codec="zstd", reference=ref, chunk_bytes=4096)
    frames["lz4-tagged-int64"] = ls.encode(random_tensor(torch.int64, (9, 70), 3), codec="lz4", chunk_bytes=4096,
                                           tag=b"key")
    frames["empty"] = ls.encode(torch.empty(0, 3), codec="lz4")
    frames["scalar"] = ls.encode(torch.tensor(2.5), codec="zstd")
    return frames


FRAMES = _small_frames()
REFERENCE = smooth_tensor(torch.bfloat16, (3000,), seed=2)


def _decode(frame: bytes) -> torch.Tensor:
    return ls.decode(frame, reference=REFERENCE)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_dtypes_shapes_codecs_filters(dtype: torch.dtype, codec: str) -> None:
    for shape in SHAPES:
        for shuffle in (False, True):
            x = random_tensor(dtype, shape, seed=len(shape))
            assert same_bits(ls.decode(ls.encode(x, codec=codec, shuffle=shuffle)), x)
            ref = random_tensor(dtype, shape, seed=99)
            frame = ls.encode(x, codec=codec, shuffle=shuffle, reference=ref)
            assert same_bits(ls.decode(frame, reference=ref), x)


def test_round_trip_large_multi_chunk_and_levels() -> None:
    x = smooth_tensor(torch.float32, (1 << 20,), seed=5)  # 4 MiB = 64 chunks of 64 KiB
    for codec, level in (("lz4", None), ("lz4", 3), ("zstd", 1), ("zstd", -3), ("zstd", 9)):
        frame = ls.encode(x, codec=codec, level=level, chunk_bytes=1 << 16)
        assert ls.parse_header(frame).chunk_count == 64
        assert same_bits(ls.decode(frame), x)


def test_non_contiguous_and_lazy_views_are_stored_as_their_values() -> None:
    base = random_tensor(torch.float32, (40, 50), seed=4)
    for view in (base.T, base[::3, 1::2], base.expand(2, 40, 50)[1], torch.randn(4, 5, dtype=torch.complex64).conj()):
        decoded = ls.decode(ls.encode(view))
        assert decoded.is_contiguous()
        assert same_bits(decoded, view.resolve_conj().contiguous())


def test_header_describes_the_tensor() -> None:
    x = smooth_tensor(torch.float16, (5, 6, 7), seed=0)
    header = ls.parse_header(ls.encode(x, codec="zstd", shuffle=True, tag=b"hello"))
    assert (header.dtype, header.shape, header.codec, header.filters) == (
        torch.float16, (5, 6, 7), ls.Codec.ZSTD, ls.Filter.SHUFFLE)
    assert header.raw_length == x.nbytes and header.tag == b"hello" and header.reference_checksum == 0


def test_shuffle_and_delta_shrink_realistic_data() -> None:
    weights = smooth_tensor(torch.float32, (256, 256), seed=0)
    previous = weights.bfloat16()
    updated = (weights - 1e-3 * torch.sign(torch.randn(256, 256))).bfloat16()
    plain = len(ls.encode(updated, codec="zstd", shuffle=False))
    shuffled = len(ls.encode(updated, codec="zstd", shuffle=True))
    delta = len(ls.encode(updated, codec="zstd", shuffle=True, reference=previous))
    assert delta < shuffled < plain


def test_delta_frames_demand_their_reference() -> None:
    frame = FRAMES["zstd-delta"]
    with pytest.raises(ls.ReferenceMismatchError, match="pass reference="):
        ls.decode(frame)
    with pytest.raises(ls.ReferenceMismatchError, match="checksum"):
        ls.decode(frame, reference=REFERENCE + 1)
    with pytest.raises(ls.ReferenceMismatchError, match="must be"):
        ls.decode(frame, reference=REFERENCE.float())


def test_encode_rejects_bad_options() -> None:
    x = torch.zeros(4)
    for kwargs, message in (({"codec": "snappy"}, "unknown codec"), ({"codec": "zstd", "level": 40}, "level"),
                            ({"codec": "none", "level": 1}, "level"), ({"chunk_bytes": 1000}, "power of two"),
                            ({"reference": torch.zeros(5)}, "reference must match"), ({"tag": b"x" * 256}, "tag")):
        with pytest.raises(ls.InvalidArgumentError, match=message):
            ls.encode(x, **kwargs)
    with pytest.raises(ls.InvalidArgumentError, match="cannot be stored"):
        ls.encode(torch.zeros(2, dtype=torch.float8_e4m3fnuz))


# ------------------------------------------------------------------------------ corruption


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_truncation_point_is_rejected(name: str) -> None:
    frame = FRAMES[name]
    assert same_bits(_decode(frame), _decode(bytes(frame)))
    assert list(ls.read_frames(io.BytesIO(b""))) == []  # an empty stream is a valid, empty export
    for cut in range(len(frame)):
        with pytest.raises(ls.TruncatedFrameError):
            _decode(frame[:cut])
        if cut:
            with pytest.raises(ls.TruncatedFrameError):
                list(ls.read_frames(io.BytesIO(frame[:cut])))


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_every_single_byte_flip_is_rejected(name: str) -> None:
    frame = bytearray(FRAMES[name])
    for position in range(len(frame)):
        frame[position] ^= 0x5A
        with pytest.raises(ls.FrameError):
            _decode(bytes(frame))
        frame[position] ^= 0x5A
    _decode(bytes(frame))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FRAMES)),
       flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=4))
def test_property_random_byte_flips_are_rejected(name: str, flips: list[tuple[int, int]]) -> None:
    frame = bytearray(FRAMES[name])
    for position, mask in flips:
        frame[position % len(frame)] ^= mask
    if bytes(frame) == FRAMES[name]:  # two flips cancelled out: still a valid frame
        assert same_bits(_decode(bytes(frame)), _decode(FRAMES[name]))
        return
    with pytest.raises(ls.FrameError):
        _decode(bytes(frame))


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=400))
def test_property_arbitrary_bytes_are_rejected(junk: bytes) -> None:
    for data in (junk, b"LSFR" + junk, FRAMES["lz4-shuffleTrue"][:FIXED_HEADER_BYTES] + junk):
        with pytest.raises(ls.FrameError):
            ls.decode(data)


def test_trailing_bytes_are_rejected_but_streams_iterate() -> None:
    frame = FRAMES["lz4-shuffleTrue"]
    with pytest.raises(ls.CorruptFrameError, match="follow the frame"):
        ls.decode(frame + b"\0")
    stream = frame + FRAMES["scalar"]
    assert [f.header.shape for f in ls.iter_frames(stream)] == [(3000,), ()]
    assert [f.header.shape for f in ls.read_frames(io.BytesIO(stream))] == [(3000,), ()]


# ------------------------------------------------------------------------------ hostile headers


def _forge(*, raw_length: int, shape: tuple[int, ...], stored: bytes = b"", dtype: int = 1, codec: int = 0,
           filter_bits: int = 0, chunk_log2: int = 20, reserved: int = 0, ndim: int | None = None,
           stored_length: int | None = None, stored_checksum: int = 0, raw_checksum: int = 0) -> bytes:
    """A frame whose header checksum is valid, so only the semantic checks can stop it."""
    ndim = len(shape) if ndim is None else ndim
    body = struct.pack("<4sHBBBBBBIQQQQQ", b"LSFR", 1, dtype, codec, filter_bits, ndim, chunk_log2, 0, reserved,
                       raw_length, len(stored) if stored_length is None else stored_length, raw_checksum,
                       stored_checksum, 0) + struct.pack(f"<{len(shape)}Q", *shape)
    return body + struct.pack("<Q", filters.checksum(body)) + stored


@pytest.mark.parametrize(("frame", "error", "message"), [
    (_forge(raw_length=1 << 62, shape=(1 << 60,)), ls.CorruptFrameError, "max_raw_bytes"),
    (_forge(raw_length=0, shape=(0, 1 << 62, 1 << 62)), ls.CorruptFrameError, "dimensions larger"),
    (_forge(raw_length=8, shape=(3,)), ls.CorruptFrameError, "needs 12 bytes"),
    (_forge(raw_length=4, shape=(1,), stored_length=1 << 40), ls.CorruptFrameError, "stored length"),
    (_forge(raw_length=4, shape=(1,), stored_length=8), ls.TruncatedFrameError, "only"),
    (_forge(raw_length=4, shape=(1,), dtype=200), ls.UnsupportedFrameError, "dtype code 200"),
    (_forge(raw_length=4, shape=(1,), codec=9), ls.UnsupportedFrameError, "codec code 9"),
    (_forge(raw_length=4, shape=(1,), filter_bits=0x80), ls.UnsupportedFrameError, "filter bits"),
    (_forge(raw_length=4, shape=(1,), chunk_log2=40), ls.CorruptFrameError, "chunk size"),
    (_forge(raw_length=4, shape=(1,), reserved=1), ls.CorruptFrameError, "reserved"),
    (_forge(raw_length=4, shape=(1,), ndim=200), ls.CorruptFrameError, "ndim is 200"),
    (b"LSFR\x02\x00" + bytes(60), ls.UnsupportedFrameError, "version 2"),
    (b"PK\x03\x04" + bytes(100), ls.CorruptFrameError, "magic"),
])
def test_hostile_headers_fail_before_allocating(frame: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ls.decode(frame)


def test_stored_chunks_are_bounded_by_their_raw_size() -> None:
    # A chunk table claiming a chunk longer than its raw bytes, or a length that does not add up.
    for stored in (chunk_table([5]) + b"12345", chunk_table([3]) + b"1234"):
        frame = _forge(raw_length=4, shape=(1,), codec=1, stored=stored,
                       stored_checksum=combine_checksums([filters.checksum(stored[4:])], stored[:4]))
        with pytest.raises(ls.CorruptFrameError, match="chunk"):
            ls.decode(frame)


def test_decompression_bomb_is_refused() -> None:
    # A zstd chunk that would expand to 64 MiB inside a frame that declares 4 KiB, checksums valid.
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20))
    assert len(bomb) < 4096
    table = chunk_table([len(bomb)])
    frame = _forge(raw_length=4096, shape=(1024,), codec=2, chunk_log2=12, stored=table + bomb,
                   stored_checksum=combine_checksums([filters.checksum(bomb)], table))
    assert parse_frame(frame).header.raw_length == 4096
    with pytest.raises(ls.CorruptFrameError, match="declares 67108864"):
        ls.decode(frame)


def test_corrupt_payload_with_valid_stored_checksum_fails_raw_checksum() -> None:
    # Simulates a codec returning wrong bytes: re-sign a modified uncompressed payload.
    x = torch.arange(1024, dtype=torch.int32)
    frame = bytearray(ls.encode(x, codec="none", shuffle=False, chunk_bytes=4096))
    header = ls.parse_header(bytes(frame))
    payload_start = header.header_length + 4
    frame[payload_start + 10] ^= 1
    stored = bytes(frame[payload_start:])
    new_sum = combine_checksums([filters.checksum(stored)], chunk_table([len(stored)]))
    forged = _forge(raw_length=4096, shape=(1024,), dtype=7, chunk_log2=12, stored=chunk_table([4096]) + stored,
                    stored_checksum=new_sum, raw_checksum=header.raw_checksum)
    with pytest.raises(ls.CorruptFrameError, match="raw checksum mismatch"):
        ls.decode(forged)


def test_max_raw_bytes_is_a_caller_limit() -> None:
    frame = ls.encode(torch.zeros(1000))
    with pytest.raises(ls.CorruptFrameError, match="max_raw_bytes=100"):
        ls.decode(frame, max_raw_bytes=100)
    assert ls.decode(frame, max_raw_bytes=4000).shape == (1000,)


def test_file_reader_never_reads_past_a_lying_length() -> None:
    class CountingFile(io.BytesIO):
        largest = 0

        def read(self, size: int = -1) -> bytes:
            CountingFile.largest = max(CountingFile.largest, size)
            return super().read(size)

    lying = _forge(raw_length=8 << 30, shape=(2 << 30,), stored_length=(2048 * 4) + (4 << 30), chunk_log2=22)
    with pytest.raises(ls.TruncatedFrameError):
        list(ls.read_frames(CountingFile(lying)))
    assert CountingFile.largest <= 16 << 20
