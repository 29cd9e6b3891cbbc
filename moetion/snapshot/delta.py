"""Delta-compressed window images: fewer bytes to move and keep, the same bits on restore.

Inside a window, an operator in a later slot has a compute snapshot in every capture before its
full one, and consecutive iterations' copies of one weight differ in few bits. So each compute
entry is stored as the XOR against the same parameter's compute entry of the previous capture,
byte-shuffled and compressed (lz4 or zstd), using logging_store's frame format; the first capture
of a window has no previous reference and is only shuffled and compressed, like every full
snapshot entry (weights, optimizer state).

The encoded form is the manifest (unchanged: it keeps every entry's checksum of the raw bytes) plus
one frame per entry in manifest order. Decoding rebuilds the raw blob capture by capture, each
delta against the capture just decoded, and verifies every entry's checksum: a decoded window is
bit-identical to the captured one or an error. Pure functions: callers run them on a background
thread (replication, persisting), never on the training thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from logging_store import LogStoreError, encode, iter_frames
from logging_store.frame import decode_frame
from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest, entry_view

COMPUTE = "compute"


@dataclass(frozen=True)
class DeltaCodec:
    """How entries are compressed: ``codec`` is ``lz4`` or ``zstd`` (``level`` for zstd)."""

    codec: str = "lz4"
    level: int | None = None


@dataclass(frozen=True)
class EncodedWindow:
    """A window's manifest and its entries as concatenated frames."""

    manifest: WindowManifest
    frames: bytes

    @property
    def stored_bytes(self) -> int:
        return len(self.frames)


FRAME_OVERHEAD_BOUND = 4096  # a frame's header and a codec's worst-case growth on a small entry


def max_encoded_bytes(manifest: WindowManifest) -> int:
    """The most an encoded window of ``manifest`` can take (incompressible data grows a little):
    a size read from disk beyond it is refused before anything is allocated."""
    entries = sum(len(capture.entries) for capture in manifest.captures)
    return manifest.blob_bytes + manifest.blob_bytes // 64 + entries * FRAME_OVERHEAD_BOUND


def encode_window(image: WindowImage, codec: DeltaCodec = DeltaCodec()) -> EncodedWindow:
    """Compresses every entry of ``image``; compute entries as XOR-deltas against the previous capture."""
    parts: list[bytes] = []
    previous: dict[str, torch.Tensor] = {}
    for capture in image.manifest.captures:
        current: dict[str, torch.Tensor] = {}
        for entry in capture.entries:
            tensor = entry_view(image.blob, entry)
            reference = previous.get(entry.param) if entry.role == COMPUTE else None
            parts.append(encode(tensor, codec=codec.codec, level=codec.level, shuffle=True, reference=reference))
            if entry.role == COMPUTE:
                current[entry.param] = tensor
        previous = current
    return EncodedWindow(image.manifest, b"".join(parts))


def decode_window(encoded: EncodedWindow, *, source: str = "delta window") -> WindowImage:
    """The raw window image, checksums verified; raises SnapshotError on any mismatch."""
    manifest = encoded.manifest
    blob = torch.zeros(manifest.blob_bytes, dtype=torch.uint8)
    entries = [(i, e) for i, capture in enumerate(manifest.captures) for e in capture.entries]
    previous: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}
    index = -1
    try:
        frames = iter_frames(encoded.frames, max_raw_bytes=max(manifest.blob_bytes, 1))
        for (capture_index, entry), frame in zip(entries, frames, strict=True):
            if capture_index != index:
                previous, current, index = current, {}, capture_index
            out = entry_view(blob, entry)
            if frame.header.dtype != out.dtype or frame.header.shape != tuple(out.shape):
                raise SnapshotError(f"{source}: frame for {entry.param} ({entry.role}) is {frame.header.dtype} "
                                    f"{frame.header.shape}, the manifest says {entry.dtype} {list(entry.shape)}")
            reference = previous.get(entry.param) if entry.role == COMPUTE else None
            decode_frame(frame, reference=reference, out=out)
            if entry.role == COMPUTE:
                current[entry.param] = out
    except (LogStoreError, ValueError) as error:  # zip(strict=True) raises ValueError on a count mismatch
        raise SnapshotError(f"{source}: cannot decode ({type(error).__name__}: {error})") from None
    image = WindowImage(manifest, blob)
    image.verify(source=source)
    return image
