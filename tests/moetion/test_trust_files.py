"""Issue 19, findings 2, 4, 5, 10-14: private shared memory, this job's windows only, checksummed and
typed manifests, private files, repairing and crash-safe persistence, and `inspect` reading logs."""
import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from logging_store import LogStore
from logging_store.keys import LogKey
from moetion.config import Config, SnapshotConfig
from moetion.errors import ConfigError
from moetion.export import _save_atomically
from moetion.job_secret import new_secret
from moetion.snapshot import persist
from moetion.run_layout import run_id
from moetion.snapshot.image import SnapshotError, WindowManifest
from moetion.snapshot.inspect import inspect_command
from moetion.snapshot.persist import AsyncPersister, list_persisted, load_window, persist_window, window_path
from moetion.snapshot.run_dir import claim_run_dir
from moetion.snapshot.shm import SharedMemoryTier
from window_image_helpers import make_image, rewrite_manifest

pytestmark = pytest.mark.timeout(60)
OTHER_UID = 4242


@pytest.fixture(autouse=True)
def lax_umask():
    """The permissions must not depend on the caller's umask: run every test under 022."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def tier(root, *, run="run-a", nonce="job-a", stage=0, replica=0):
    return SharedMemoryTier(root, run_id=run, job_nonce=nonce, stage=stage, replica=replica)


def publish(tier_, image):
    """Writes ``image`` into ``tier_`` the way the checkpointer does: a fresh blob, then the pointer."""
    blob = tier_.new_blob(image.manifest.start_iteration, image.manifest.blob_bytes)
    blob.copy_(image.blob[: image.manifest.blob_bytes])
    tier_.publish(image.manifest)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(os.lstat(p).st_mode) for p in [root, *root.rglob("*")]}


# -- finding 2: shared memory ------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by another uid")
def test_a_shared_memory_root_of_another_user_is_refused(tmp_path):
    root = tmp_path / "shm"
    root.mkdir(mode=0o700)
    os.chown(root, OTHER_UID, OTHER_UID)
    with pytest.raises(SnapshotError, match=f"owned by uid {OTHER_UID}"):
        tier(root)
    assert list(root.iterdir()) == []


def test_a_shared_memory_root_others_can_enter_is_refused(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    os.chmod(root, 0o755)
    with pytest.raises(SnapshotError, match="mode 0755 lets other users in"):
        tier(root)
    assert list(root.iterdir()) == []


def test_a_planted_symlink_in_shared_memory_is_refused(tmp_path):
    root, elsewhere = tmp_path / "shm", tmp_path / "elsewhere"
    root.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (root / "run-a").symlink_to(elsewhere)
    with pytest.raises(SnapshotError, match="is a symlink"):
        tier(root)
    assert list(elsewhere.iterdir()) == []


def test_shared_memory_is_private_and_a_window_of_another_run_job_or_stage_is_refused(tmp_path):
    root = tmp_path / "shm"
    ours = tier(root)
    image, _ = make_image(run_id="run-a", job_nonce="job-a", start_iteration=1)
    publish(ours, image)
    assert ours.load_complete().manifest == image.manifest
    assert {m & 0o077 for m in modes(root).values()} == {0}, modes(root)  # 0700 dirs, 0600 files
    for other in (dict(run="run-b"), dict(nonce="job-b"), dict(stage=1)):
        # a window of another run (or job, or stage), checksums intact, planted where this tier reads
        forged = tier(root, **other)
        for name in ("complete.json", "window-0000000001.bin"):
            os.replace(ours.directory / name, forged.directory / name)
        with pytest.raises(SnapshotError, match="not this job's window"):
            forged.load_complete()
        for name in ("complete.json", "window-0000000001.bin"):
            os.replace(forged.directory / name, ours.directory / name)


def test_default_shared_memory_root_is_per_user_and_run_ids_are_unpredictable(monkeypatch):
    assert SnapshotConfig().shm_dir == f"/dev/shm/moetion-{os.geteuid()}"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("MOETION_JOB_SECRET", new_secret())
    first = run_id(SnapshotConfig())
    monkeypatch.setenv("MOETION_JOB_SECRET", new_secret())
    second = run_id(SnapshotConfig())
    assert first != second and "29500" not in first + second


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "..", "a/b", "x" * 200])
def test_run_ids_are_plain_directory_names(bad):
    with pytest.raises(ConfigError, match=r"\[A-Za-z0-9._-\]"):
        run_id(SnapshotConfig(run_id=bad))


# -- finding 4: pruning keeps a window every stage has -----------------------------------------------
def test_pruning_never_leaves_stages_without_a_common_window(tmp_path):
    for t0 in (0, 3):  # the slow stage 1 has persisted only windows 0 and 3
        persist_window(make_image(stage=1, start_iteration=t0)[0], tmp_path)
    persister = AsyncPersister(tmp_path, keep=1)
    for t0 in (0, 3, 6, 9):  # the fast stage 0 runs ahead
        persister.submit(make_image(stage=0, start_iteration=t0, seed=t0)[0])
        persister.wait()
    persister.close()
    held = {(w.stage, w.start_iteration) for w in list_persisted(tmp_path)}
    assert {(0, 3), (1, 3)} <= held, held  # window 3: the newest every stage holds, kept
    assert (0, 0) not in held  # older ones still go
    # windows of another job under the same run are never pruned
    persist_window(make_image(stage=0, start_iteration=12, job_nonce="job-other")[0], tmp_path)
    persister = AsyncPersister(tmp_path, keep=1)
    persister.limit_pruning(restorable_start=9, num_stages=2)
    persister.submit(make_image(stage=0, start_iteration=15)[0])
    persister.close()
    assert (0, 12) in {(w.stage, w.start_iteration) for w in list_persisted(tmp_path)}


# -- finding 5 and 14: checksummed, typed manifests; inspect reads logs.bin --------------------------
def test_an_edited_manifest_fails_its_checksum_and_inspect(tmp_path, capsys):
    path = persist_window(make_image(start_iteration=3)[0], tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    raw["threads"] = 2  # was 1: replay would use another thread count and silently differ
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SnapshotError, match="manifest checksum mismatch"):
        load_window(path)
    assert inspect_command(tmp_path) == 1
    assert "manifest checksum mismatch" in capsys.readouterr().out


def test_a_manifest_is_every_field_of_its_dataclasses_and_reads_back_equal():
    """The hand-written encoding (fast on the capture thread) holds exactly what a generic one would."""
    manifest = make_image(start_iteration=3)[0].manifest
    raw = json.loads(manifest.to_json())
    raw.pop("manifest_sha256")
    assert raw == json.loads(json.dumps(dataclasses.asdict(manifest)))
    assert WindowManifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize("field, value", [("threads", True), ("stage", "0"), ("run_id", 7), ("blob_bytes", 1.5)])
def test_a_wrongly_typed_manifest_field_is_a_clear_error(tmp_path, capsys, field, value):
    """A one-line SnapshotError, and `inspect` reports it (exit 1) instead of raising."""
    path = persist_window(make_image(start_iteration=3)[0], tmp_path)
    rewrite_manifest(path / "manifest.json", **{field: value})
    with pytest.raises(SnapshotError, match=rf"manifest\.{field} is {type(value).__name__}"):
        load_window(path)
    assert inspect_command(tmp_path) == 1
    assert f"manifest.{field} is {type(value).__name__}" in capsys.readouterr().out


def test_an_entry_field_of_the_wrong_type_is_refused(tmp_path):
    path = persist_window(make_image(start_iteration=3)[0], tmp_path)
    raw = json.loads((path / "manifest.json").read_text())
    raw["captures"][0]["entries"][0]["offset"] = "64"
    rewrite_manifest(path / "manifest.json", captures=raw["captures"])
    with pytest.raises(SnapshotError, match=r"captures\[0\]\.entries\[0\]\.offset is str"):
        load_window(path)


def test_inspect_verifies_the_upstream_logs(tmp_path, capsys):
    with LogStore() as store:
        store.put(LogKey(3, 0, "activation", 1), torch.arange(4096, dtype=torch.float32))
        logs = store.export()
    path = persist_window(make_image(start_iteration=3)[0], tmp_path, logs=logs)
    assert inspect_command(tmp_path) == 0
    raw = bytearray((path / "logs.bin").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (path / "logs.bin").write_bytes(bytes(raw))
    assert inspect_command(tmp_path) == 1
    assert "logs.bin: upstream logs damaged" in capsys.readouterr().out


# -- finding 10 and 13: private files, atomic writes -------------------------------------------------
def test_everything_persisted_is_private(tmp_path):
    with LogStore() as store:
        store.put(LogKey(3, 0, "activation", 1), torch.ones(8))
        logs = store.export()
    persist_window(make_image(start_iteration=3)[0], tmp_path / "disk" / "run", logs=logs)
    claim_run_dir(tmp_path / "disk" / "run", Config(), fresh_nonce="job-a", resume=False, writer=True)
    out = tmp_path / "out"
    out.mkdir()
    _save_atomically({"model": {"w": torch.ones(2)}}, out / "dense.pt")
    found = {**modes(tmp_path / "disk"), **{f"out/{k}": v for k, v in modes(out).items() if k != "."}}
    for name, mode in found.items():
        is_dir = (tmp_path / "disk" / name).is_dir() if not name.startswith("out/") else False
        assert mode == (0o700 if is_dir else 0o600), (name, oct(mode))


def test_temporary_names_are_unpredictable_and_never_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # the names today's writers use: a planted link there must not redirect the write
    (out / f".dense.pt.tmp-{os.getpid()}").symlink_to(victim)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / ".config.json.tmp").symlink_to(victim)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    _save_atomically({"w": torch.ones(2)}, out / "dense.pt")
    claim_run_dir(run, Config(), fresh_nonce="job-a", resume=False, writer=True)
    assert victim.read_text() == "precious"
    assert str(out) in synced and str(run) in synced  # the directories' new names are durable too
    assert synced.index(str(out)) > max(i for i, p in enumerate(synced) if "dense.pt" in p)


# -- finding 11 and 12: persisting repairs; a replacement is crash-safe ------------------------------
def test_persisting_a_window_again_repairs_a_flipped_bit(tmp_path):
    image, _ = make_image(start_iteration=3)
    path = persist_window(image, tmp_path)
    raw = bytearray((path / "blob.bin").read_bytes())
    raw[0] ^= 0x01
    (path / "blob.bin").write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        load_window(path)
    persist_window(image, tmp_path)
    load_window(path)  # intact again


class _Crash(BaseException):
    """The writer dies here (not an error it could handle)."""


def _crash_on_rename_into_place(monkeypatch):
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tmp-window-"):
            raise _Crash()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_a_crash_while_replacing_a_window_leaves_a_readable_one(tmp_path, monkeypatch, exchange):
    old, _ = make_image(start_iteration=3, seed=1)
    new, _ = make_image(start_iteration=3, seed=2)
    persist_window(old, tmp_path)
    if not exchange:
        monkeypatch.setattr(persist, "_exchange", lambda a, b: False)  # a file system that cannot swap
    _crash_on_rename_into_place(monkeypatch)
    try:
        persist_window(new, tmp_path)
    except _Crash:
        assert not exchange
    monkeypatch.undo()
    windows = list_persisted(tmp_path)
    assert [w.start_iteration for w in windows] == [3]
    loaded = load_window(window_path(tmp_path, stage=0, replica=0, start_iteration=3))
    assert loaded.manifest in (old.manifest, new.manifest)
