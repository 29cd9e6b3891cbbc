"""Records of a recovery that cross processes, each defined once with its serialisation.

A rank's :class:`RecoveryEvents` travel through the control store to the supervisor, the fault
harness's timeline and the metrics; a torn or malformed record read back is a warning and an
empty record, never a traceback.
"""
from __future__ import annotations

import enum
import json
import logging
from dataclasses import asdict, dataclass, field, fields

log = logging.getLogger(__name__)


class RestoreSource(str, enum.Enum):
    """Where a restoring rank's state comes from, fastest first (DESIGN.md §4)."""

    REPLICA = "replica"  # a live data-parallel replica's exact state
    SHM = "shm"  # its own window in node-local shared memory
    PEER = "peer"  # the window replica a peer holds
    DISK = "disk"  # its persisted window
    INITIAL = "initial"  # the initial state (no window completed yet)


class Role(str, enum.Enum):
    SURVIVOR = "survivor"
    REPLACEMENT = "replacement"


@dataclass
class RecoveryEvents:
    """One rank's view of one recovery (wall-clock seconds since the epoch; None: did not happen)."""

    role: Role
    cause: str = ""  # why a survivor abandoned its iteration
    notice_generation: int | None = None  # the generation whose failure notice broke the survivor's wait
    noticed_at: float | None = None
    iteration: int | None = None  # a survivor's in-flight iteration when it lost its peer
    detected_at: float | None = None
    inflight_s: float = 0.0  # work of the abandoned iteration, now discarded
    joined_at: float | None = None
    restore_at: float | None = None  # a replacement's script reached train_batch
    state_loaded_at: float | None = None
    logs_received_at: float | None = None
    bytes_received: int = 0
    window_bytes: int = 0  # bytes of the state a restoring rank loaded: its window, or a live replica's state
    bytes_sent: int = 0
    replayed: int = 0
    replay_s: float = 0.0
    source: RestoreSource | None = None
    resume: int | None = None  # the iteration the plan resumed at
    ready_at: float | None = None
    resumed_at: float | None = None
    retries: list[str] = field(default_factory=list)  # generations that failed during this recovery

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "RecoveryEvents | None":
        """The record, or None (with a warning) when it is torn or malformed."""
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            if not isinstance(raw, dict) or not known >= set(raw):
                raise ValueError(f"unexpected fields {sorted(set(raw) - known) if isinstance(raw, dict) else raw!r}")
            events = cls(**raw)
            events.role = Role(events.role)
            events.source = None if events.source is None else RestoreSource(events.source)
            return events
        except (ValueError, TypeError) as error:
            log.warning("ignoring a malformed recovery record: %s", str(error)[:200])
            return None
