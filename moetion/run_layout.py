"""Where a run lives: its id, its persist directory and the config written beside its windows.

Every rank, every replacement and the offline tools derive the same paths from the same settings,
so this is the one place that names them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from moetion.config import Config, SnapshotConfig

RUN_CONFIG = "config.json"


def run_id(settings: SnapshotConfig) -> str:
    """The job's name in shared memory and on disk; identical on every rank and on replacements."""
    if settings.run_id:
        return settings.run_id
    if os.environ.get("MOETION_RUN_ID"):
        return os.environ["MOETION_RUN_ID"]
    return f"job-{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"


def persist_root(settings: SnapshotConfig) -> Path | None:
    """``persist_dir/<run_id>``, where the run's windows and logs are persisted (None: not persisting)."""
    return Path(settings.persist_dir) / run_id(settings) if settings.persist_dir else None


def write_run_config(root: Path, config: Config) -> None:
    """The job's config beside its persisted windows: offline replay must use exactly these settings."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RUN_CONFIG}.tmp"
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, root / RUN_CONFIG)
