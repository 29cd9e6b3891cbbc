"""Names a process for ``ps``/``top`` (``/proc/<pid>/comm``), so an operator, or a test, can tell a
job's control store and its idle warm spares from its ranks: they are all Python processes."""
from __future__ import annotations

import ctypes

_PR_SET_NAME = 15
MAX_CHARS = 15  # the kernel keeps at most this many


def set_process_name(name: str) -> None:
    """Best effort: cosmetic where ``prctl`` is missing (not Linux)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:MAX_CHARS], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def process_name() -> str:
    try:
        with open("/proc/self/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""
