"""Shared-memory window files are recycled: a retired window's file becomes the next window's, and
the pointer always names an intact window while that happens."""
from __future__ import annotations

import torch

from moetion.snapshot.shm import SharedMemoryTier

from window_image_helpers import make_image


def _write_and_publish(tier: SharedMemoryTier, start: int, *, seed: int, in_use=lambda blob: False) -> tuple[torch.Tensor, dict]:
    image, expected = make_image(start_iteration=start, seed=seed)
    n = image.manifest.blob_bytes
    blob = tier.new_blob(start, n, in_use=in_use)
    blob[:n].copy_(image.blob[:n])
    tier.publish(image.manifest)
    return blob, expected


def _assert_holds(tier: SharedMemoryTier, expected: dict) -> None:
    image = tier.load_complete()  # verifies every checksum
    for capture in image.manifest.captures:
        for entry in capture.entries:
            assert torch.equal(image.tensor(entry), expected[(capture.iteration, entry.param, entry.role)])


def test_a_retired_window_file_is_reused_by_the_next_window(tmp_path):
    tier = SharedMemoryTier(tmp_path, run_id="run-test", job_nonce="job-test", stage=0, replica=0)
    first, _ = _write_and_publish(tier, 0, seed=1)
    _, expected_second = _write_and_publish(tier, 3, seed=2)
    assert (tier.files_created, tier.files_recycled) == (2, 0)
    image, expected_third = make_image(start_iteration=6, seed=3)
    n = image.manifest.blob_bytes
    third = tier.new_blob(6, n)
    assert tier.files_recycled == 1 and third.data_ptr() == first.data_ptr()  # window 0's mapping, no new file
    third[:n].copy_(image.blob[:n])
    _assert_holds(tier, expected_second)  # writing the recycled file leaves the complete window intact
    tier.publish(image.manifest)
    _assert_holds(tier, expected_third)
    assert sorted(p.name for p in tier.directory.iterdir()) == ["complete.json", "spare.bin", "window-0000000006.bin"]


def test_a_file_a_tier_still_reads_is_not_reused(tmp_path):
    tier = SharedMemoryTier(tmp_path, run_id="run-test", job_nonce="job-test", stage=0, replica=0)
    first, _ = _write_and_publish(tier, 0, seed=1)
    _write_and_publish(tier, 3, seed=2)
    third, expected = _write_and_publish(tier, 6, seed=3, in_use=lambda blob: blob.data_ptr() == first.data_ptr())
    assert (tier.files_created, tier.files_recycled) == (3, 0) and third.data_ptr() != first.data_ptr()
    _assert_holds(tier, expected)


def test_a_spare_too_small_for_the_next_window_is_dropped(tmp_path):
    tier = SharedMemoryTier(tmp_path, run_id="run-test", job_nonce="job-test", stage=0, replica=0)
    _write_and_publish(tier, 0, seed=1)
    _write_and_publish(tier, 3, seed=2)
    image, _ = make_image(start_iteration=6, seed=3)
    tier.new_blob(6, image.manifest.blob_bytes * 2)
    assert (tier.files_created, tier.files_recycled) == (3, 0)
    assert not (tier.directory / "spare.bin").exists()


def test_windows_kept_for_a_group_replay_stay_until_retired_and_a_replacement_finds_them(tmp_path):
    tier = SharedMemoryTier(tmp_path, run_id="run-test", job_nonce="job-test", stage=0, replica=0)
    images = {}
    for seed, start in enumerate((1, 4, 7)):
        image, expected = make_image(start_iteration=start, seed=seed)
        n = image.manifest.blob_bytes
        tier.new_blob(start, n)[:n].copy_(image.blob[:n])
        tier.publish(image.manifest, keep_from=1)  # window 1 is the one every replica holds
        images[start] = expected
    assert tier.held_starts() == [1, 4, 7] and tier.complete_start() == 7
    tier.retire_before(7)  # 7 became common
    assert tier.held_starts() == [7]
    tier.retire_before(9)  # never the newest
    assert tier.held_starts() == [7]
    replacement = SharedMemoryTier(tmp_path, run_id="run-test", job_nonce="job-test", stage=0, replica=0)
    assert replacement.held_starts() == [7]
    image = replacement.load_kept(7)
    for capture in image.manifest.captures:
        for entry in capture.entries:
            assert torch.equal(image.tensor(entry), images[7][(capture.iteration, entry.param, entry.role)])
    assert sorted(p.name for p in tier.directory.iterdir()) == [
        "complete.json", "spare.bin", "window-0000000007.bin", "window-0000000007.json"]
