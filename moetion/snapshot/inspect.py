"""``moetion inspect DIR``: what the disk tier holds, per stage and replica (windows, operators: how many
experts are snapshotted one by one and how many operators whole), and whether it is intact."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from logging_store.errors import LogStoreError
from logging_store.frame import read_frames
from moetion.operators import KINDS, OPERATOR_KINDS
from moetion.progress import track
from moetion.snapshot.image import SnapshotError, WindowManifest
from moetion.snapshot.persist import LOGS, MANIFEST, iter_window_dirs, load_window, read_manifest

_COLUMNS = (("stage", "stage"), ("replica", "replica"), ("iterations", "iterations"), ("W", "window"),
            ("ops/slot", "operators_per_slot"), ("ops", "operators"), ("experts", "expert_operators"),
            ("dense", "dense_operators"), ("held", "experts"), ("bytes", "bytes"), ("run", "run_id"),
            ("integrity", "integrity"))


def inspect_dir(root: Path, *, verify: bool = True, quiet: bool = True) -> list[dict[str, Any]]:
    """One row per window directory under ``root``, unreadable ones included (their integrity says why).

    With ``verify`` every blob and every upstream-log file is read (one window, one frame at a
    time) and every checksum checked; without, only manifests and file sizes are checked. Unless
    ``quiet``, a terminal shows a progress bar.
    """
    root = Path(root)
    if not root.is_dir():
        raise SnapshotError(f"{root} is not a directory; pass the directory that windows were persisted to")
    rows = []
    for stage, replica, t0, path in track(list(iter_window_dirs(root)), desc="inspect: windows", quiet=quiet):
        row: dict[str, Any] = {
            "stage": stage, "replica": replica, "start_iteration": t0, "end_iteration": None, "iterations": f"{t0}..?",
            "window": None, "operators_per_slot": None, "operators": None, "expert_operators": None,
            "dense_operators": None, "experts": None, "run_id": None,
            "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()), "path": str(path),
        }
        with contextlib.suppress(OSError, SnapshotError):  # describe the window even if its blob is bad
            manifest = WindowManifest.from_json((path / MANIFEST).read_bytes())
            counts = [len(slot) for slot in manifest.slots]
            row.update(end_iteration=manifest.end_iteration, iterations=f"{t0}..{manifest.end_iteration}",
                       window=manifest.window, operators_per_slot="/".join(map(str, counts)),
                       operators=sum(counts), experts=expert_placement(manifest), run_id=manifest.run_id,
                       **_kinds(manifest))
        try:
            if verify:
                load_window(path, verify=True)  # reads the blob and checks every checksum
                verify_logs(path)
            else:
                read_manifest(path)  # manifest, location and blob size only
            row.update(ok=True, integrity="ok" if verify else "ok (not verified)")
        except SnapshotError as error:
            row.update(ok=False, integrity=str(error))
        rows.append(row)
    return rows


def _kinds(manifest: WindowManifest) -> dict[str, int]:
    """Expert and dense operators (routers counted as dense: snapshotted whole) of the window's stage,
    as its capture recorded them; nothing for a window written before they were recorded."""
    kinds = manifest.extra.get(OPERATOR_KINDS)
    if not (isinstance(kinds, dict) and all(type(kinds.get(k)) is int for k in KINDS)):
        return {}
    return {"expert_operators": kinds["expert"], "dense_operators": kinds["router"] + kinds["dense"]}


def expert_placement(manifest: WindowManifest) -> str:
    """The expert indices the window holds (every MoE layer of a stage holds the same ones), and,
    under expert parallelism, the replica's expert rank: ``"2,3 (ep rank 1/2)"``; ``"-"`` for none."""
    held = sorted({int(name.rpartition(".experts.")[2].split(".")[0])
                   for slot in manifest.slots for name in slot if ".experts." in name})
    if not held:
        return "-"
    ep_size = int(manifest.extra.get("expert_parallel", 1))
    indices = ",".join(map(str, held))
    return f"{indices} (ep rank {manifest.replica % ep_size}/{ep_size})" if ep_size > 1 else indices


def verify_logs(window_dir: Path) -> int:
    """Checks every frame of the window's ``logs.bin`` (if any) without decoding it; returns the
    number of frames. SnapshotError naming the file and the first bad frame."""
    path = Path(window_dir) / LOGS
    frames = 0
    try:
        with open(path, "rb") as f:
            for _ in read_frames(f):
                frames += 1
    except FileNotFoundError:
        return 0
    except (OSError, LogStoreError) as error:
        raise SnapshotError(f"{path}: upstream logs damaged at frame {frames} ({error}); this window cannot be "
                            "replayed offline: delete it and use an older window") from None
    return frames


def format_inspection(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``inspect_dir`` rows, one line per window."""
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "?"
        return human_bytes(value) if key == "bytes" else str(value)

    table = [[title for title, _ in _COLUMNS]] + [[cell(row, key) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in table)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def inspect_command(root: Path, *, verify: bool = True, as_json: bool = False, quiet: bool = False) -> int:
    """Prints the inspection of ``root``; returns the exit code (1 if any window fails integrity)."""
    rows = inspect_dir(root, verify=verify, quiet=quiet)
    if not rows:
        raise SnapshotError(f"no persisted windows under {root} (expected stage-SSS/replica-RRR/window-TTTTTTTTTT/ directories)")
    print("\n".join(json.dumps(row, sort_keys=True) for row in rows) if as_json else format_inspection(rows))
    bad = [row for row in rows if not row["ok"]]
    if bad:
        print(f"moetion inspect: {len(bad)} of {len(rows)} windows failed integrity: "
              + ", ".join(row["path"] for row in bad), file=sys.stderr)
    return 1 if bad else 0
