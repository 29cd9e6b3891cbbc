"""A run's persist directory (``persist_dir/<run_id>``) and who owns it.

``config.json`` there holds the config the windows were captured with (offline replay must reuse
it exactly) and the job nonce of the run. A fresh job claims an empty directory by writing it; a
directory already holding another job's run is refused (never adopted, never pruned, its
``config.json`` never overwritten), unless the job was started to resume that run (``--resume``),
in which case it continues under the recorded nonce and config.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moetion.config import Config
from moetion.errors import ConfigError
from moetion.run_layout import RUN_CONFIG
from moetion.private_files import check_private_file, private_dir, write_atomically
from moetion.snapshot.image import SnapshotError
from moetion.snapshot.persist import list_persisted

NONCE_KEY = "job_nonce"
MAX_RUN_CONFIG_BYTES = 1 << 20
log = logging.getLogger(__name__)


def claim_run_dir(root: Path, config: Config, *, fresh_nonce: str, resume: bool, writer: bool) -> str:
    """The job nonce this job writes its windows under, after checking ``root`` is this job's to use.

    Call on every rank at start-up (``writer``: the one rank that writes ``config.json``). A fresh
    job (``resume`` False) gets ``fresh_nonce``; a resumed one the nonce ``config.json`` records.
    """
    root = private_dir(root)
    recorded = read_run_nonce(root)
    if resume:
        if recorded is None:
            raise ConfigError(f"--resume: {root} holds no run to resume (no {RUN_CONFIG}); check snapshot.persist_dir "
                              "and snapshot.run_id (MOETION_RUN_ID), or start without --resume")
        log.info("resuming run %s (job nonce %s) from %s", root.name, recorded, root)
        return recorded
    if recorded is not None and recorded != fresh_nonce:
        windows = sum(1 for p in root.glob("stage-*/replica-*/window-*") if p.is_dir())
        raise ConfigError(f"{root} already holds run {root.name!r} of another job (job nonce {recorded}, {windows} "
                          "window(s)): pass --resume (MOETION_RESUME=1) to continue it, choose another snapshot.run_id, "
                          "or delete that directory")
    if writer and recorded is None:
        write_atomically(root / RUN_CONFIG, json.dumps({**config.to_dict(), NONCE_KEY: fresh_nonce},
                                                       indent=2, sort_keys=True).encode())
    return fresh_nonce


def check_resumable(root: Path, *, num_stages: int, data_parallel: int) -> str:
    """Before a whole-job restart from ``root``: every window there belongs to the run's recorded
    job; logs what was found and returns the job nonce. SnapshotError if another job's windows
    are mixed in (copied by hand: a fresh job never writes into another's directory)."""
    nonce = read_run_nonce(root)
    if nonce is None:
        raise SnapshotError(f"{root}: no {RUN_CONFIG}; not a run's persist directory (persist_dir/<run_id>), or the "
                            "run never persisted a window")
    windows = list_persisted(root)
    foreign = sorted({w.job_nonce for w in windows} - {nonce})
    if foreign:
        paths = [str(w.path) for w in windows if w.job_nonce != nonce][:3]
        raise SnapshotError(f"{root}: windows of other jobs {foreign} (e.g. {', '.join(paths)}) are mixed with run "
                            f"{root.name!r} (job nonce {nonce}); remove them to restart")
    starts = sorted({w.start_iteration for w in windows})
    log.info("resuming run %s (job nonce %s) from %s: %d windows of %d stage(s) x %d replica(s), starting at %s",
             root.name, nonce, root, len(windows), num_stages, data_parallel, starts)
    return nonce


def read_run_nonce(root: Path) -> str | None:
    """The job nonce recorded in ``root/config.json``; None when there is no such file."""
    record = _read_record(Path(root) / RUN_CONFIG)
    if record is None:
        return None
    nonce = record.get(NONCE_KEY)
    if not isinstance(nonce, str):
        raise ConfigError(f"{Path(root) / RUN_CONFIG}: no {NONCE_KEY!r} string: written by an older moetion or "
                          "edited; move the directory aside and start afresh")
    return nonce


def read_run_record(root: Path) -> tuple[Config, str]:
    """(config the run was captured with, its job nonce) from ``root/config.json``."""
    path = Path(root) / RUN_CONFIG
    record = _read_record(path)
    if record is None:
        raise FileNotFoundError(2, "No such file or directory", str(path))
    nonce = record.pop(NONCE_KEY, None)
    if not isinstance(nonce, str):
        raise ConfigError(f"{path}: no {NONCE_KEY!r} string: written by an older moetion or edited")
    return Config.from_dict(record), nonce


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        check_private_file(path)
        with open(path, "rb") as f:
            data = f.read(MAX_RUN_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_RUN_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_RUN_CONFIG_BYTES} bytes; not a run config")
    try:
        record = json.loads(data)
    except ValueError as error:
        raise ConfigError(f"{path}: not JSON ({error}); the run's config is damaged") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: a {type(record).__name__}, expected a JSON object")
    return record
