"""Delta-compressed windows decode to the captured bits, including the first capture of a window,
which has no previous compute copy to be a delta against."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from logging_store import Filter
from logging_store.frame import iter_frames
from moetion.config import SnapshotConfig
from moetion.errors import ConfigError
from moetion.snapshot.delta import DeltaCodec, EncodedWindow, decode_window, encode_window, max_encoded_bytes
from moetion.snapshot.persist import load_persisted, load_window, persist_window
from moetion.snapshot.image import Capture, SnapshotError, WindowImage, checksum, entry_view

from window_image_helpers import make_image


def _slowly_changing(image: WindowImage) -> WindowImage:
    """The same window with each compute copy equal to the previous capture's plus a small step, as
    consecutive iterations' weights are (random copies would not compress)."""
    blob = image.blob.clone()
    previous: dict[str, torch.Tensor] = {}
    for capture in image.manifest.captures:
        current = {}
        for entry in capture.entries:
            if entry.role != "compute":
                continue
            view = entry_view(blob, entry)
            if entry.param in previous:
                view.copy_(previous[entry.param] + torch.full_like(view, 1e-3))
            current[entry.param] = view.clone()
        previous = current
    return _rechecksummed(WindowImage(image.manifest, blob))


def _rechecksummed(image: WindowImage) -> WindowImage:
    captures = tuple(Capture(c.iteration, tuple(replace(e, checksum=checksum(image.blob[e.offset : e.offset + e.nbytes]))
                                                for e in c.entries)) for c in image.manifest.captures)
    return WindowImage(replace(image.manifest, captures=captures), image.blob)


@pytest.mark.parametrize("codec", [DeltaCodec("lz4"), DeltaCodec("zstd", 1)])
def test_decoded_window_is_bit_exact(codec):
    image = _slowly_changing(make_image(start_iteration=10, seed=4)[0])
    decoded = decode_window(encode_window(image, codec))
    for capture in image.manifest.captures:
        for entry in capture.entries:
            assert torch.equal(decoded.tensor(entry), image.tensor(entry)), (capture.iteration, entry.param, entry.role)


def test_only_compute_entries_after_the_first_capture_are_deltas():
    image = make_image(seed=5)[0]
    encoded = encode_window(image)
    frames = iter(iter_frames(encoded.frames))
    for i, capture in enumerate(image.manifest.captures):
        for entry in capture.entries:
            is_delta = bool(next(frames).header.filters & Filter.XOR_DELTA)
            assert is_delta == (entry.role == "compute" and i > 0), (i, entry.param, entry.role)
    assert next(frames, None) is None
    assert decode_window(encoded).blob.numel() == image.manifest.blob_bytes


def test_a_delta_decoded_against_another_window_is_rejected():
    """Negative control: frames of one window with the manifest of another (same layout, other bits)."""
    first, second = make_image(seed=7)[0], make_image(seed=8)[0]
    mixed = EncodedWindow(second.manifest, encode_window(first).frames)
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        decode_window(mixed)


def test_a_truncated_stream_is_rejected():
    encoded = encode_window(make_image(seed=9)[0])
    with pytest.raises(SnapshotError, match="cannot decode"):
        decode_window(EncodedWindow(encoded.manifest, encoded.frames[: len(encoded.frames) // 2]))


@pytest.mark.parametrize("codec", [DeltaCodec("lz4"), DeltaCodec("zstd", 3)])
def test_a_window_persisted_delta_compressed_loads_bit_exact(tmp_path, codec):
    image = _slowly_changing(make_image(start_iteration=10, seed=4)[0])
    path = persist_window(image, tmp_path, codec=codec)
    assert sorted(p.name for p in path.iterdir()) == ["blob.delta", "manifest.json"]
    loaded = load_persisted(tmp_path, stage=image.manifest.stage, replica=0)
    assert loaded.manifest == image.manifest
    assert all(torch.equal(loaded.tensor(e), image.tensor(e)) for c in image.manifest.captures for e in c.entries)
    assert persist_window(image, tmp_path, codec=codec) == path  # the same window is recognised, not rewritten


def test_a_corrupted_or_oversized_delta_window_is_refused_naming_the_file(tmp_path):
    image = _slowly_changing(make_image(start_iteration=10, seed=4)[0])
    path = persist_window(image, tmp_path, codec=DeltaCodec("lz4"))
    delta = path / "blob.delta"
    raw = bytearray(delta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    delta.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="blob.delta"):
        load_window(path)
    with open(delta, "ab") as f:
        f.truncate(max_encoded_bytes(image.manifest) + 1)
    with pytest.raises(SnapshotError, match=r"blob.delta: \d+ bytes is more than"):
        load_window(path)


def test_persist_codec_is_validated():
    with pytest.raises(ConfigError, match="snapshot.persist_codec must be one of"):
        SnapshotConfig(persist_codec="gzip")
