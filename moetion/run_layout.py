"""Where a run lives: its id and its persist directory (``config.json`` there: :mod:`moetion.snapshot.run_dir`).

Every rank, every replacement and the offline tools derive the same paths from the same settings,
so this is the one place that names them.
"""
from __future__ import annotations

from pathlib import Path

from moetion.config import SnapshotConfig
from moetion import env
from moetion.run_identity import check_run_id, default_run_id

RUN_CONFIG = "config.json"

def run_id(settings: SnapshotConfig) -> str:
    """The job's name in shared memory and on disk; identical on every rank and on replacements
    (a plain directory name, see :func:`moetion.run_identity.check_run_id`; unpredictable when unset)."""
    if settings.run_id:
        return check_run_id(settings.run_id)
    if env.run_id():
        return check_run_id(env.run_id(), what=env.RUN_ID)
    return default_run_id()


def persist_root(settings: SnapshotConfig) -> Path | None:
    """``persist_dir/<run_id>``, where the run's windows and logs are persisted (None: not persisting)."""
    return Path(settings.persist_dir) / run_id(settings) if settings.persist_dir else None
