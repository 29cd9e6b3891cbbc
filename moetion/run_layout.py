"""Where a run lives: its id and its persist directory (``config.json`` there: :mod:`moetion.snapshot.run_dir`).

Every rank, every replacement and the offline tools derive the same paths from the same settings,
so this is the one place that names them.
"""
from __future__ import annotations

import os
from pathlib import Path

from moetion.config import SnapshotConfig
from moetion.run_identity import RUN_ID_ENV, check_run_id, default_run_id

RUN_CONFIG = "config.json"


def run_id(settings: SnapshotConfig) -> str:
    """The job's name in shared memory and on disk; identical on every rank and on replacements
    (a plain directory name, see :func:`moetion.run_identity.check_run_id`; unpredictable when unset)."""
    if settings.run_id:
        return check_run_id(settings.run_id)
    if os.environ.get(RUN_ID_ENV):
        return check_run_id(os.environ[RUN_ID_ENV], what=RUN_ID_ENV)
    return default_run_id()


def persist_root(settings: SnapshotConfig) -> Path | None:
    """``persist_dir/<run_id>``, where the run's windows and logs are persisted (None: not persisting)."""
    return Path(settings.persist_dir) / run_id(settings) if settings.persist_dir else None
