"""The disk tier: complete window images persisted for whole-job restarts and offline export.

Layout: ``root/stage-SSS/replica-RRR/window-TTTTTTTTTT/{manifest.json,blob.bin}`` (T: the window's
start iteration), or ``blob.delta`` in place of ``blob.bin`` when written with a codec (the entries
as delta-compressed frames, :mod:`moetion.snapshot.delta`; loading decodes and verifies them). A window directory appears only by ``os.rename`` of a fully written, fsynced
sibling ``.tmp-*`` directory; readers ignore ``.tmp-*`` leftovers of crashed writers (delete them
by hand at leisure). No pickle: a JSON manifest, raw bytes, and a checksum per tensor.

Directories are 0700 and files 0600 (:mod:`moetion.private_files`): windows hold weights and logs
derived from training data. Replacing a window swaps the two directories atomically
(``renameat2(RENAME_EXCHANGE)``), so a crash leaves the old window or the new one; where the file
system cannot swap, the old one is renamed aside first and put back by the next reader if the
writer died in between. Pruning deletes only this job's windows (by job nonce), only below the
newest window every stage holds and the job-wide restorable start.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from moetion.errors import ConfigError
from moetion.faults import fault_point
from moetion.private_files import UnsafePathError, create_exclusive, fsync_dir, private_dir
from moetion.profiling import thread_cpu_seconds
from moetion.snapshot.delta import DeltaCodec, EncodedWindow, decode_window, encode_window, max_encoded_bytes
from moetion.snapshot.image import SnapshotError, WindowImage, WindowManifest
from moetion.window import BackgroundWork

MANIFEST = "manifest.json"
BLOB = "blob.bin"
DELTA = "blob.delta"  # the blob's entries as delta-compressed frames
LOGS = "logs.bin"  # the window's upstream logs: a logging_store export stream (checksummed frames)
TMP_PREFIX = ".tmp-"
CHUNK_BYTES = 64 << 20  # bounded write size: no single huge syscall, no copy of the blob
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersistedWindow:
    """One window directory on disk, described by its (readable) manifest."""

    stage: int
    replica: int
    start_iteration: int
    window: int
    end_iteration: int
    run_id: str
    path: Path
    blob_bytes: int
    job_nonce: str

    @classmethod
    def of(cls, m: WindowManifest, path: Path) -> PersistedWindow:
        return cls(m.stage, m.replica, m.start_iteration, m.window, m.end_iteration, m.run_id, path, m.blob_bytes,
                   m.job_nonce)


def window_path(root: Path, *, stage: int, replica: int, start_iteration: int) -> Path:
    return Path(root) / f"stage-{stage:03d}" / f"replica-{replica:03d}" / f"window-{start_iteration:010d}"


def iter_window_dirs(root: Path) -> list[tuple[int, int, int, Path]]:
    """Every window directory as (stage, replica, start_iteration, path), readable or not, sorted."""
    return [(stage, replica, t0, path) for stage, stage_dir in _numbered(Path(root), "stage")
            for replica, replica_dir in _numbered(stage_dir, "replica")
            for t0, path in _numbered(_put_back_replaced(replica_dir), "window")]


def persist_window(image: WindowImage, root: Path, *, verify: bool = True, logs: bytes | None = None,
                   codec: DeltaCodec | None = None) -> Path:
    """Writes ``image`` atomically under ``root``; returns its window directory.

    ``verify`` first checks the in-memory checksums (native, ~10 GB/s), so a corrupted copy is
    refused rather than persisted as good. The same window already on disk (identical manifest,
    which holds every checksum, and blob size) is not rewritten; a different one is renamed to
    ``.tmp-replaced-*``, replaced, then deleted. The blob must not change while it is written;
    it may map a file the caller has already unlinked. ``logs`` (what this stage sent during the
    window, as a ``LogStore.export`` stream) are written beside it, in the same atomic step.
    With ``codec`` the blob is written delta-compressed (``blob.delta``).
    """
    m, blob = image.manifest, image.blob
    dest = window_path(root, stage=m.stage, replica=m.replica, start_iteration=m.start_iteration)
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.device.type != "cpu":
        raise SnapshotError(f"window blob must be a 1-D uint8 CPU tensor, got {blob.dtype} {tuple(blob.shape)} on {blob.device}")
    if blob.numel() < m.blob_bytes or verify:
        image.verify(source=f"window {m.start_iteration} of stage {m.stage} replica {m.replica} (in memory)")
    manifest_bytes = m.to_json()
    if _already_on_disk(dest, manifest_bytes, logs):
        _log.debug("%s already holds this window, intact; not rewriting it", dest)
        return dest
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        private_dir(dest.parent)
        private_dir(tmp)
        _write_file(tmp / MANIFEST, memoryview(manifest_bytes))
        if codec is None:
            _write_file(tmp / BLOB, memoryview(blob[: m.blob_bytes].contiguous().numpy()))  # no copy of the blob
        else:
            _write_file(tmp / DELTA, memoryview(encode_window(image, codec).frames))
        if logs is not None:
            _write_file(tmp / LOGS, memoryview(logs))
        fsync_dir(tmp)
        fault_point("persistence", stage=m.stage, replica=m.replica, iteration=m.end_iteration)
        if os.path.lexists(dest) and _exchange(tmp, dest):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the window it replaced
        else:
            old = dest.parent / f"{TMP_PREFIX}replaced-{dest.name}-{uuid.uuid4().hex[:8]}"
            if os.path.lexists(dest):
                os.rename(dest, old)  # a crash from here to the next rename: readers put `old` back
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        for directory in (dest.parent, dest.parent.parent, dest.parent.parent.parent):
            fsync_dir(directory)  # make the new names (window, and replica/stage if new) durable
    except (OSError, UnsafePathError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"cannot persist window to {dest}: {error}; check that {root} is a writable directory with free space") from error
    _log.info("persisted window %d..%d of stage %d replica %d to %s (%d bytes%s)",
              m.start_iteration, m.end_iteration, m.stage, m.replica, dest, m.blob_bytes,
              "" if codec is None else f", {(dest / DELTA).stat().st_size} stored")
    return dest


def _already_on_disk(dest: Path, manifest_bytes: bytes, logs: bytes | None) -> bool:
    """True when ``dest`` holds exactly this window and its blob verifies (a flipped bit on disk
    is repaired by rewriting, not kept because the manifest matches)."""
    with contextlib.suppress(OSError, SnapshotError):
        if (dest / MANIFEST).read_bytes() == manifest_bytes and (logs is None or (dest / LOGS).read_bytes() == logs):
            load_window(dest, verify=True)
            return True
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps directories ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system or file system cannot, so the caller falls back to two renames."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


_LIBC = ctypes.CDLL(None, use_errno=True)


def _put_back_replaced(replica_dir: Path) -> Path:
    """A writer that died between its two renames left ``window-T`` missing and the old window
    under ``.tmp-replaced-window-T-*``: rename it back (it is complete: it was a window)."""
    if not replica_dir.is_dir():
        return replica_dir
    for aside in replica_dir.glob(f"{TMP_PREFIX}replaced-window-*"):
        match = re.fullmatch(rf"{re.escape(TMP_PREFIX)}replaced-(window-\d+)-[0-9a-f]+", aside.name)
        if match and not os.path.lexists(replica_dir / match.group(1)):
            with contextlib.suppress(OSError):
                os.rename(aside, replica_dir / match.group(1))
                _log.warning("put back window %s, left aside by a writer that died while replacing it", match.group(1))
    return replica_dir


def list_persisted(root: Path) -> list[PersistedWindow]:
    """Windows with a readable manifest, sorted; others are skipped with a warning (inspect says why)."""
    found = []
    for _, _, _, path in iter_window_dirs(root):
        try:
            found.append(PersistedWindow.of(read_manifest(path), path))
        except SnapshotError as error:
            _log.warning("skipping unreadable persisted window: %s", error)
    return found


def read_manifest(window_dir: Path) -> WindowManifest:
    """Parses and checks a window directory's manifest and blob size, without reading the blob."""
    window_dir = Path(window_dir)
    manifest_path, blob_path = window_dir / MANIFEST, window_dir / BLOB
    advice = f"delete {window_dir} and load another window or tier"
    try:
        m = WindowManifest.from_json(manifest_path.read_bytes(), source=str(manifest_path))
        if not blob_path.exists() and (window_dir / DELTA).exists():
            return _checked_home(m, window_dir)  # its size is checked when it is decoded
        size = blob_path.stat().st_size
    except OSError as error:
        raise SnapshotError(f"{error.filename}: missing or unreadable ({error.strerror}); {advice}") from None
    except SnapshotError as error:
        raise SnapshotError(f"{error}; {advice}") from None
    _checked_home(m, window_dir)
    if size != m.blob_bytes:
        problem = "truncated" if size < m.blob_bytes else "longer than expected"
        raise SnapshotError(f"{blob_path}: {problem}: {size} bytes, manifest says {m.blob_bytes}; {advice}")
    return m


def load_window(window_dir: Path, *, verify: bool = True) -> WindowImage:
    """Reads one window directory into memory; with ``verify`` every tensor's checksum is checked."""
    window_dir = Path(window_dir)
    m = read_manifest(window_dir)
    if (window_dir / DELTA).exists():
        return _load_delta(window_dir, m)
    blob = torch.empty(m.blob_bytes, dtype=torch.uint8)
    view, done = memoryview(blob.numpy()), 0
    try:
        with open(window_dir / BLOB, "rb", buffering=0) as f:
            while done < m.blob_bytes and (n := f.readinto(view[done : done + CHUNK_BYTES])):
                done += n
    except OSError as error:
        raise SnapshotError(f"{window_dir / BLOB}: cannot read blob ({error.strerror})") from None
    if done != m.blob_bytes:
        raise SnapshotError(f"{window_dir / BLOB}: truncated while reading: {done} of {m.blob_bytes} bytes")
    image = WindowImage(m, blob)
    if verify:
        image.verify(source=str(window_dir / BLOB))
    return image


def _checked_home(m: WindowManifest, window_dir: Path) -> WindowManifest:
    home = window_path(Path(), stage=m.stage, replica=m.replica, start_iteration=m.start_iteration)
    if home.parts != window_dir.parts[-3:]:
        raise SnapshotError(f"{window_dir / MANIFEST}: describes stage {m.stage} replica {m.replica} window "
                            f"{m.start_iteration}, which belongs in {home}; the directory was moved or mixed up")
    return m


def _load_delta(window_dir: Path, m: WindowManifest) -> WindowImage:
    """A delta-compressed window, decoded; every entry's checksum is always verified (decoding does)."""
    path = window_dir / DELTA
    try:
        size = path.stat().st_size
        if size > max_encoded_bytes(m):
            raise SnapshotError(f"{path}: {size} bytes is more than a {m.blob_bytes}-byte window can encode to")
        frames = path.read_bytes()
    except OSError as error:
        raise SnapshotError(f"{path}: cannot read ({error.strerror})") from None
    return decode_window(EncodedWindow(m, frames), source=str(path))


def load_window_logs(window_dir: Path) -> bytes:
    """The upstream logs persisted with a window (import them with ``LogStore.import_``, which
    verifies every frame); a window persisted without logs is an error naming the directory."""
    path = Path(window_dir) / LOGS
    try:
        return path.read_bytes()
    except OSError as error:
        raise SnapshotError(
            f"{path}: no upstream logs persisted with this window ({error.strerror}); enable "
            "upstream_log and persist_dir together to make windows replayable offline"
        ) from None


def load_persisted(root: Path, *, stage: int, replica: int, iteration: int | None = None, verify: bool = True) -> WindowImage:
    """Loads the newest window of (stage, replica), or the one that *starts* at ``iteration``
    (windows are named by their start: recovery replays from there). A bad window is reported,
    never silently skipped: the error names the older windows to try instead."""
    dirs = iter_window_dirs(root)
    ours = [(t0, path) for s, r, t0, path in dirs if (s, r) == (stage, replica)]
    if not ours:
        listing = ", ".join(f"stage {s} replica {r}" for s, r in sorted({d[:2] for d in dirs})) or "none"
        raise SnapshotError(f"no persisted window of stage {stage} replica {replica} under {root}; present: {listing}")
    match = ours[-1:] if iteration is None else [(t0, path) for t0, path in ours if t0 == iteration]
    if not match:
        raise SnapshotError(f"no persisted window of stage {stage} replica {replica} starts at iteration {iteration}; "
                            f"windows start at {[t0 for t0, _ in ours]}")
    t0, path = match[0]
    try:
        return load_window(path, verify=verify)
    except SnapshotError as error:
        older = [t for t, _ in ours if t < t0]
        raise SnapshotError(f"{error}" + (f"; older windows start at {older} (pass iteration=...)" if older else "")) from None


def prune_persisted(root: Path, *, stage: int, replica: int, keep: int, job_nonce: str, below: int) -> list[Path]:
    """Deletes windows of (stage, replica) captured by job ``job_nonce`` that start before ``below``,
    except the newest ``keep`` (>= 1); returns their paths. Windows of another job, and windows
    whose manifest cannot be read, are never touched. Each is renamed to ``.tmp-*`` first, so a
    crash mid-delete never leaves half a window."""
    if keep < 1:
        raise ConfigError(f"keep must be at least 1 (the newest window is never pruned), got {keep}")
    ours = [w for w in list_persisted(root) if (w.stage, w.replica, w.job_nonce) == (stage, replica, job_nonce)]
    removed = [w.path for w in ours[:-keep] if w.start_iteration < below]
    for path in removed:
        doomed = path.parent / f"{TMP_PREFIX}pruned-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed


def newest_common_start(root: Path, *, job_nonce: str, holders: set[tuple[int, int]] | None = None) -> int | None:
    """The start of the newest window of job ``job_nonce`` that every (stage, replica) in ``holders``
    has on disk (default: every one that has any window of that job here); None if there is none."""
    starts: dict[tuple[int, int], set[int]] = {}
    for w in list_persisted(root):
        if w.job_nonce == job_nonce:
            starts.setdefault((w.stage, w.replica), set()).add(w.start_iteration)
    wanted = set(starts) if holders is None else holders
    if not wanted or not wanted <= set(starts):
        return None
    common = set.intersection(*(starts[h] for h in wanted))
    return max(common) if common else None


class AsyncPersister:
    """Persists window images on a background thread so training never waits for the disk.

    One image is written while at most one waits: a newer submission replaces the waiting one (the
    disk only needs the latest window), never the one being written. After each write, that stage
    and replica's older windows of the same job are pruned, keeping the newest ``keep`` and every
    window from the newest one all stage replicas hold on disk and from the job-wide restorable
    start (:meth:`limit_pruning`) on: a slow stage and a fast one never end up without a window in
    common. ``close()`` drains the queue.
    """

    def __init__(self, root: Path, *, keep: int = 2, verify: bool = True, codec: DeltaCodec | None = None) -> None:
        if keep < 1:
            raise ConfigError(f"keep must be at least 1, got {keep}")
        self.root, self.keep, self.verify, self.codec = Path(root), keep, verify, codec
        self._limit: tuple[int, int] | None = None  # (job-wide restorable start, number of stages)
        self._cond = threading.Condition()
        self._pending: tuple[WindowImage, bytes | None] | None = None
        self._writing: WindowImage | None = None
        self._busy = self._closing = False
        self._error: BaseException | None = None
        self._last: PersistedWindow | None = None
        self._bytes: dict[tuple[int, int], int] = {}
        self.bytes_written = 0  # window blob bytes persisted so far
        self._thread = threading.Thread(target=self._run, name="moetion-persist", daemon=True)
        self._thread.start()

    @property
    def last_persisted(self) -> PersistedWindow | None:
        """The newest window this persister has completely written, or None."""
        with self._cond:
            return self._last

    @property
    def bytes_on_disk(self) -> int:
        """Bytes on disk, after pruning, of the windows of the (stage, replica) pairs this persister wrote."""
        with self._cond:
            return sum(self._bytes.values())

    def work(self, *, share: float) -> BackgroundWork:
        """This thread's CPU-seconds and blob bytes written so far; ``share``: of captured windows persisted."""
        return BackgroundWork(thread_cpu_seconds(self._thread), self.bytes_written, share)

    def limit_pruning(self, *, restorable_start: int, num_stages: int) -> None:
        """Never prune windows from ``restorable_start`` (agreed by every stage) on; ``num_stages``
        names the stages whose windows must share a start. A constant-time call: the engine may
        make it every iteration."""
        self._limit = (restorable_start, num_stages)

    def submit(self, image: WindowImage, *, logs: bytes | None = None) -> None:
        """Queues ``image`` (and its logs) for writing and returns at once. The blob must stay
        unchanged until written."""
        with self._cond:
            if self._closing:
                raise SnapshotError("AsyncPersister is closed; create a new one")
            if self._pending is not None:
                old = self._pending[0].manifest
                _log.warning("disk is behind: dropping unwritten window %d of stage %d for window %d; persist less often",
                             old.start_iteration, old.stage, image.manifest.start_iteration)
            self._pending = (image, logs)
            self._cond.notify_all()

    def reads(self, blob: torch.Tensor) -> bool:
        """Whether ``blob`` is the blob of a window waiting to be written or being written."""
        with self._cond:
            waiting = self._pending[0] if self._pending is not None else None
            return any(image is not None and image.blob.data_ptr() == blob.data_ptr()
                       for image in (waiting, self._writing))

    def wait(self) -> None:
        """Blocks until nothing is written or waiting; re-raises (once) the first write error."""
        with self._cond:
            while self._busy or self._pending is not None:
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error

    def raise_error(self) -> None:
        """Re-raises (once) a write error the background thread hit, without waiting for anything.

        The training thread calls it every iteration, so a full disk or a lost directory stops the
        job at the next iteration instead of surfacing only at ``close()``; the check is one
        attribute read while nothing failed.
        """
        if self._error is None:
            return
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Finishes the writes already submitted, stops the thread, and re-raises any write error."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                (image, logs), self._pending, self._busy = self._pending, None, True
                self._writing = image
            m, record, size, error = image.manifest, None, 0, None
            try:
                path = persist_window(image, self.root, verify=self.verify, logs=logs, codec=self.codec)
                prune_persisted(self.root, stage=m.stage, replica=m.replica, keep=self.keep, job_nonce=m.job_nonce,
                                below=self._prune_below(m))
                record = PersistedWindow.of(m, path)
                size = sum(f.stat().st_size for f in path.parent.glob("window-*/*"))
            except Exception as caught:  # noqa: BLE001 - handed to wait()
                _log.error("persisting window %d of stage %d failed: %s", m.start_iteration, m.stage, caught)
                error = caught
            del image, logs  # drop the blob (possibly a mapping of shared memory) before waiting again
            with self._cond:
                self._busy, self._writing = False, None
                if error is not None:
                    self._error = self._error or error
                else:
                    self._last, self._bytes[(record.stage, record.replica)] = record, size
                    self.bytes_written += m.blob_bytes
                self._cond.notify_all()


    def _prune_below(self, m: WindowManifest) -> int:
        limit = self._limit
        holders = None
        if limit is not None:
            replicas = int(m.extra.get("data_parallel", 1))
            holders = {(s, r) for s in range(limit[1]) for r in range(replicas)}
        common = newest_common_start(self.root, job_nonce=m.job_nonce, holders=holders)
        if common is None and holders is not None:
            # Not every stage's windows are here (a host-local disk): the stages present must agree.
            common = newest_common_start(self.root, job_nonce=m.job_nonce)
        if common is None:
            return -1  # no window in common yet: keep everything
        return common if limit is None else min(common, limit[0])


def _numbered(parent: Path, kind: str) -> list[tuple[int, Path]]:
    if not parent.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in parent.iterdir() if (m := re.fullmatch(rf"{kind}-(\d+)", p.name)) and p.is_dir())


def _write_file(path: Path, data: memoryview) -> None:
    with os.fdopen(create_exclusive(path), "wb", buffering=0) as f:  # 0600, never through a planted link
        for start in range(0, len(data), CHUNK_BYTES):
            chunk = data[start : start + CHUNK_BYTES]
            while len(chunk):
                chunk = chunk[f.write(chunk) :]
        os.fsync(f.fileno())
