"""The disk tier: atomic persist, exact round trip, every kind of damage rejected with a clear error."""
from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import torch
from window_image_helpers import make_image

from moetion.errors import ConfigError
from moetion.snapshot import persist
from moetion.snapshot.image import SnapshotError
from moetion.snapshot.persist import (
    AsyncPersister, list_persisted, load_persisted, persist_window, prune_persisted, window_path,
)

pytestmark = pytest.mark.timeout(30)


def _assert_same(loaded, image, expected) -> None:
    assert loaded.manifest == image.manifest
    seen = 0
    for capture in loaded.manifest.captures:
        for entry in capture.entries:
            got = loaded.tensor(entry)
            want = expected[(capture.iteration, entry.param, entry.role)]
            assert got.dtype == want.dtype and torch.equal(got, want), (capture.iteration, entry)
            seen += 1
    assert seen == len(expected)


def _tmp_leftovers(root):
    return [p for p in root.rglob(".tmp-*")]


def test_round_trip_is_exact(tmp_path):
    image, expected = make_image(stage=1, replica=2, start_iteration=12, slack=100)
    path = persist_window(image, tmp_path)
    assert path == tmp_path / "stage-001" / "replica-002" / "window-0000000012"
    assert sorted(p.name for p in path.iterdir()) == ["blob.bin", "manifest.json"]
    assert (path / "blob.bin").stat().st_size == image.manifest.blob_bytes  # the slack past blob_bytes is not written
    assert json.loads((path / "manifest.json").read_bytes())["start_iteration"] == 12
    assert _tmp_leftovers(tmp_path) == []
    loaded = load_persisted(tmp_path, stage=1, replica=2)
    assert loaded.blob.dtype == torch.uint8 and loaded.blob.numel() == image.manifest.blob_bytes
    _assert_same(loaded, image, expected)
    kinds = {str(t.dtype) for t in expected.values()}
    assert kinds == {"torch.float32", "torch.bfloat16", "torch.int64"}


def test_blob_mapped_from_an_unlinked_file_is_persisted(tmp_path):
    image, expected = make_image(start_iteration=3)
    shm = tmp_path / "shm-window"
    shm.write_bytes(image.blob.numpy().tobytes())
    mapped = torch.from_file(str(shm), shared=True, size=image.blob.numel(), dtype=torch.uint8)
    shm.unlink()
    persist_window(type(image)(image.manifest, mapped), tmp_path / "disk")
    _assert_same(load_persisted(tmp_path / "disk", stage=0, replica=0), image, expected)


def test_list_sorted_and_ignores_temporary_and_unreadable(tmp_path, caplog):
    for stage, t0 in [(1, 3), (0, 3), (1, 0), (0, 0)]:
        persist_window(make_image(stage=stage, start_iteration=t0)[0], tmp_path)
    replica_dir = tmp_path / "stage-000" / "replica-000"
    (replica_dir / ".tmp-window-0000000006-123-abcd").mkdir()
    (replica_dir / ".tmp-window-0000000006-123-abcd" / "manifest.json").write_text("{")
    broken = replica_dir / "window-0000000009"
    broken.mkdir()
    with caplog.at_level(logging.WARNING):
        found = list_persisted(tmp_path)
    assert [(w.stage, w.replica, w.start_iteration) for w in found] == [(0, 0, 0), (0, 0, 3), (1, 0, 0), (1, 0, 3)]
    first = found[0]
    assert (first.window, first.end_iteration, first.run_id) == (3, 2, "run-test")
    assert first.path == window_path(tmp_path, stage=0, replica=0, start_iteration=0)
    assert first.blob_bytes == (first.path / "blob.bin").stat().st_size
    assert str(broken / "manifest.json") in caplog.text


def test_crashed_writer_leaves_previous_window_loadable(tmp_path):
    image, expected = make_image(start_iteration=0)
    persist_window(image, tmp_path)
    # A writer killed mid-way through window 3: a partial temporary directory, never renamed.
    newer, _ = make_image(start_iteration=3, seed=1)
    partial = tmp_path / "stage-000" / "replica-000" / ".tmp-window-0000000003-999-deadbeef"
    partial.mkdir()
    (partial / "manifest.json").write_bytes(newer.manifest.to_json())
    (partial / "blob.bin").write_bytes(newer.blob.numpy().tobytes()[:100])
    _assert_same(load_persisted(tmp_path, stage=0, replica=0), image, expected)
    assert [w.start_iteration for w in list_persisted(tmp_path)] == [0]


def test_write_failing_midway_publishes_nothing(tmp_path, monkeypatch):
    image, expected = make_image(start_iteration=0)
    persist_window(image, tmp_path)
    real = persist._write_file

    def dies_in_blob(path, data):
        if path.name == "blob.bin":
            real(path, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(persist, "_write_file", dies_in_blob)
    with pytest.raises(SnapshotError, match="cannot persist window to .*window-0000000003: .*No space left"):
        persist_window(make_image(start_iteration=3, seed=1)[0], tmp_path)
    assert [w.start_iteration for w in list_persisted(tmp_path)] == [0]
    assert _tmp_leftovers(tmp_path) == []
    _assert_same(load_persisted(tmp_path, stage=0, replica=0), image, expected)


def test_newest_by_default_and_selection_by_start_iteration(tmp_path):
    images = {t0: make_image(start_iteration=t0, seed=t0) for t0 in (0, 3, 6)}
    for image, _ in images.values():
        persist_window(image, tmp_path)
    assert load_persisted(tmp_path, stage=0, replica=0).manifest.start_iteration == 6
    _assert_same(load_persisted(tmp_path, stage=0, replica=0, iteration=3), *images[3])
    with pytest.raises(SnapshotError, match=r"starts at iteration 4; windows start at \[0, 3, 6\]"):
        load_persisted(tmp_path, stage=0, replica=0, iteration=4)


def test_unknown_stage_lists_existing(tmp_path):
    for stage in (0, 2):
        persist_window(make_image(stage=stage)[0], tmp_path)
    with pytest.raises(SnapshotError) as info:
        load_persisted(tmp_path, stage=1, replica=0)
    assert "stage 1 replica 0" in str(info.value)
    assert "present: stage 0 replica 0, stage 2 replica 0" in str(info.value)
    with pytest.raises(SnapshotError, match="present: none"):
        load_persisted(tmp_path / "nothing-here", stage=0, replica=0)


def test_flipped_byte_names_entry_and_file(tmp_path):
    persist_window(make_image(start_iteration=0)[0], tmp_path)
    image, expected = make_image(start_iteration=3, seed=1)
    path = persist_window(image, tmp_path)
    entry = image.manifest.captures[1].entries[0]
    blob_path = path / "blob.bin"
    raw = bytearray(blob_path.read_bytes())
    raw[entry.offset + 1] ^= 0x10
    blob_path.write_bytes(raw)
    with pytest.raises(SnapshotError) as info:
        load_persisted(tmp_path, stage=0, replica=0)
    message = str(info.value)
    assert str(blob_path) in message and "checksum mismatch" in message
    assert f"iteration 4, {entry.param} ({entry.role})" in message
    assert "older windows start at [0]" in message
    # Without verification the damaged bytes come through: verification is what caught them.
    unchecked = load_persisted(tmp_path, stage=0, replica=0, verify=False)
    assert not torch.equal(unchecked.tensor(entry), expected[(4, entry.param, entry.role)])
    assert load_persisted(tmp_path, stage=0, replica=0, iteration=0).manifest.start_iteration == 0


@pytest.mark.parametrize("change, problem", [(-7, "truncated"), (5, "longer than expected")])
def test_wrong_blob_size(tmp_path, change, problem):
    image, _ = make_image()
    path = persist_window(image, tmp_path)
    blob_path = path / "blob.bin"
    raw = blob_path.read_bytes()
    blob_path.write_bytes(raw[:change] if change < 0 else raw + b"\0" * change)
    with pytest.raises(SnapshotError) as info:
        load_persisted(tmp_path, stage=0, replica=0)
    assert f"{blob_path}: {problem}" in str(info.value)
    assert f"manifest says {image.manifest.blob_bytes}" in str(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong-format", "missing"])
def test_bad_manifest(tmp_path, damage):
    image, _ = make_image()
    path = persist_window(image, tmp_path)
    manifest_path = path / "manifest.json"
    good = manifest_path.read_bytes()
    if damage == "missing":
        manifest_path.unlink()
    else:
        manifest_path.write_bytes({"garbage": b"\x89PNG not json at all", "truncated": good[: len(good) // 2], "empty": b"",
                                   "wrong-format": good.replace(b"moetion-window/2", b"moetion-window/0")}[damage])
    with pytest.raises(SnapshotError) as info:
        load_persisted(tmp_path, stage=0, replica=0)
    assert str(manifest_path) in str(info.value) and f"delete {path}" in str(info.value)


def test_missing_blob(tmp_path):
    path = persist_window(make_image()[0], tmp_path)
    (path / "blob.bin").unlink()
    with pytest.raises(SnapshotError, match="blob.bin: missing or unreadable") as info:
        load_persisted(tmp_path, stage=0, replica=0)
    assert str(path / "blob.bin") in str(info.value)


def test_window_moved_to_the_wrong_stage_is_rejected(tmp_path):
    path = persist_window(make_image(stage=0)[0], tmp_path)
    wrong = window_path(tmp_path, stage=1, replica=0, start_iteration=0)
    wrong.parent.mkdir(parents=True)
    os.rename(path, wrong)
    with pytest.raises(SnapshotError, match="belongs in stage-000/replica-000/window-0000000000"):
        load_persisted(tmp_path, stage=1, replica=0)


def test_corrupted_image_in_memory_is_not_persisted(tmp_path):
    image, _ = make_image()
    image.blob[image.manifest.captures[0].entries[0].offset] ^= 0xFF
    with pytest.raises(SnapshotError, match=r"\(in memory\): checksum mismatch"):
        persist_window(image, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_same_window_twice_skips_and_changed_window_replaces(tmp_path):
    image, _ = make_image(start_iteration=3)
    path = persist_window(image, tmp_path)
    inode = (path / "blob.bin").stat().st_ino
    assert persist_window(image, tmp_path) == path
    assert (path / "blob.bin").stat().st_ino == inode  # identical content: not rewritten
    changed, expected = make_image(start_iteration=3, seed=7)
    assert persist_window(changed, tmp_path) == path
    _assert_same(load_persisted(tmp_path, stage=0, replica=0), changed, expected)
    assert _tmp_leftovers(tmp_path) == []


def test_prune_keeps_the_newest(tmp_path):
    for t0 in (0, 3, 6, 9):
        persist_window(make_image(start_iteration=t0)[0], tmp_path)
    persist_window(make_image(stage=1, start_iteration=0)[0], tmp_path)
    removed = prune_persisted(tmp_path, stage=0, replica=0, keep=2, job_nonce="job-test", below=9)
    assert [p.name for p in removed] == ["window-0000000000", "window-0000000003"]
    assert [(w.stage, w.start_iteration) for w in list_persisted(tmp_path)] == [(0, 6), (0, 9), (1, 0)]
    assert prune_persisted(tmp_path, stage=0, replica=0, keep=5, job_nonce="job-test", below=9) == []
    with pytest.raises(ConfigError, match="at least 1"):
        prune_persisted(tmp_path, stage=0, replica=0, keep=0, job_nonce="job-test", below=9)
    assert _tmp_leftovers(tmp_path) == []


def test_async_persister_writes_prunes_and_reports(tmp_path):
    images = [make_image(start_iteration=t0, seed=t0) for t0 in (0, 3, 6)]
    persister = AsyncPersister(tmp_path, keep=2)
    assert persister.last_persisted is None and persister.bytes_on_disk == 0
    for image, _ in images:
        persister.submit(image)
        persister.wait()
    last = persister.last_persisted
    assert last is not None and (last.start_iteration, last.end_iteration) == (6, 8)
    on_disk = sum(f.stat().st_size for f in tmp_path.rglob("window-*/*"))
    assert persister.bytes_on_disk == on_disk > 2 * images[0][0].manifest.blob_bytes
    persister.close()
    assert [w.start_iteration for w in list_persisted(tmp_path)] == [3, 6]
    _assert_same(load_persisted(tmp_path, stage=0, replica=0), *images[2])
    with pytest.raises(SnapshotError, match="closed"):
        persister.submit(images[0][0])


def test_async_persister_drops_only_pending_images(tmp_path, monkeypatch, caplog):
    started, release = threading.Event(), threading.Event()
    real = persist.persist_window

    def slow_persist(image, root, **options):
        started.set()
        assert release.wait(10)
        return real(image, root, **options)

    monkeypatch.setattr(persist, "persist_window", slow_persist)
    images = [make_image(start_iteration=t0, seed=t0)[0] for t0 in (0, 3, 6)]
    persister = AsyncPersister(tmp_path, keep=10)
    persister.submit(images[0])
    assert started.wait(10)  # window 0 is being written
    with caplog.at_level(logging.WARNING):
        persister.submit(images[1])
        persister.submit(images[2])  # replaces the pending window 3, not the in-flight window 0
    assert "dropping unwritten window 3 of stage 0 for window 6" in caplog.text
    release.set()
    persister.close()
    assert [w.start_iteration for w in list_persisted(tmp_path)] == [0, 6]


def test_async_persister_reraises_write_errors_once(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("not a directory")
    persister = AsyncPersister(not_a_dir)
    persister.submit(make_image()[0])
    with pytest.raises(SnapshotError, match=f"cannot persist window to {not_a_dir}"):
        persister.wait()
    assert persister.last_persisted is None and persister.bytes_on_disk == 0
    persister.wait()  # reported once
    persister.close()
