"""``moetion inspect DIR``: one row per persisted window, integrity checked, clear exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from window_image_helpers import make_image

from moetion.cli import main
from moetion.snapshot.image import SnapshotError
from moetion.snapshot.inspect import format_inspection, human_bytes, inspect_dir
from moetion.snapshot.persist import persist_window

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def _populate(root: Path) -> dict[tuple[int, int], Path]:
    paths = {}
    for stage, t0 in [(0, 0), (0, 3), (1, 3)]:
        image, _ = make_image(stage=stage, start_iteration=t0, run_id=f"run-{stage}")
        paths[(stage, t0)] = persist_window(image, root)
    return paths


def _flip_byte(window: Path) -> None:
    manifest = json.loads((window / "manifest.json").read_bytes())
    offset = manifest["captures"][2]["entries"][0]["offset"]
    raw = bytearray((window / "blob.bin").read_bytes())
    raw[offset] ^= 1
    (window / "blob.bin").write_bytes(raw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetion.cli", "inspect", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_inspect_rows(tmp_path):
    paths = _populate(tmp_path)
    rows = inspect_dir(tmp_path)
    assert [(r["stage"], r["replica"], r["iterations"]) for r in rows] == [(0, 0, "0..2"), (0, 0, "3..5"), (1, 0, "3..5")]
    first = rows[0]
    assert (first["window"], first["operators_per_slot"], first["operators"]) == (3, "2/1/2", 5)
    assert first["run_id"] == "run-0" and rows[2]["run_id"] == "run-1"
    assert all(r["integrity"] == "ok" and r["ok"] for r in rows)
    window = paths[(0, 0)]
    assert first["bytes"] == sum(f.stat().st_size for f in window.iterdir())
    assert [r["integrity"] for r in inspect_dir(tmp_path, verify=False)] == ["ok (not verified)"] * 3


def test_inspect_reports_damage_without_hiding_other_windows(tmp_path):
    paths = _populate(tmp_path)
    _flip_byte(paths[(0, 3)])
    (paths[(1, 3)] / "manifest.json").write_text("{not json")
    (paths[(0, 0)].parent / "window-0000000009").mkdir()  # a window whose files never arrived
    blob = paths[(0, 0)] / "blob.bin"
    blob.write_bytes(blob.read_bytes()[:-1])
    rows = inspect_dir(tmp_path)
    assert [r["ok"] for r in rows] == [False, False, False, False]
    assert f"{blob}: truncated" in rows[0]["integrity"] and rows[0]["operators_per_slot"] == "2/1/2"  # still described
    assert "checksum mismatch in iteration 5" in rows[1]["integrity"]
    assert str(paths[(0, 0)].parent / "window-0000000009" / "manifest.json") in rows[2]["integrity"]
    assert str(paths[(1, 3)] / "manifest.json") in rows[3]["integrity"]
    assert rows[3]["iterations"] == "3..?" and rows[3]["window"] is None
    unverified = inspect_dir(tmp_path, verify=False)
    assert unverified[1]["integrity"] == "ok (not verified)" and unverified[1]["ok"]  # only checksums catch a flip
    assert not unverified[0]["ok"]  # sizes are checked even without verification
    text = format_inspection(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "replica", "iterations", "W", "ops/slot", "ops", "experts", "dense", "held", "bytes", "run",
                                "integrity"]
    assert len(lines) == 5 and "2/1/2" in lines[1] and "?" in lines[4]
    with pytest.raises(SnapshotError, match="is not a directory"):
        inspect_dir(tmp_path / "missing")


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 2**20 + 2**19, 3 * 2**40)] == ["0 B", "1023 B", "1.0 KiB", "5.5 MiB", "3.0 TiB"]


def test_cli_lists_windows_and_exits_zero(tmp_path):
    _populate(tmp_path)
    done = _cli(str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("stage") and len(lines) == 4
    assert "0..2" in lines[1] and "3..5" in lines[3] and "run-1" in lines[3]
    assert all(line.rstrip().endswith("ok") for line in lines[1:])


def test_cli_corrupted_window_exits_one_naming_it(tmp_path):
    paths = _populate(tmp_path)
    _flip_byte(paths[(0, 3)])
    done = _cli(str(tmp_path))
    assert done.returncode == 1
    assert len(done.stdout.splitlines()) == 4  # the table is still printed
    assert f"1 of 3 windows failed integrity: {paths[(0, 3)]}" in done.stderr
    assert "checksum mismatch" in done.stdout.splitlines()[2]


def test_cli_missing_dir_exits_one(tmp_path):
    done = _cli(str(tmp_path / "nope"))
    assert done.returncode == 1
    assert f"moetion inspect: error: {tmp_path / 'nope'} is not a directory" in done.stderr


def test_cli_json_no_verify_and_empty_dir_in_process(tmp_path, capsys):
    paths = _populate(tmp_path / "windows")
    _flip_byte(paths[(0, 0)])
    assert main(["inspect", str(tmp_path / "windows"), "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["stage"], r["start_iteration"], r["end_iteration"]) for r in rows] == [(0, 0, 2), (0, 3, 5), (1, 3, 5)]
    assert "checksum mismatch" in rows[0]["integrity"] and rows[0]["operators_per_slot"] == "2/1/2"
    assert rows[1]["integrity"] == "ok"
    assert main(["inspect", str(tmp_path / "windows"), "--no-verify"]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert "no persisted windows under" in capsys.readouterr().err


def test_inspect_shows_expert_and_dense_operators_of_each_stage(tmp_path):
    from dataclasses import replace
    from moetion.operators import OPERATOR_KINDS
    image, _ = make_image(stage=2, start_iteration=4)
    image.manifest = replace(image.manifest, extra={OPERATOR_KINDS: {"expert": 12, "router": 3, "dense": 1}})
    persist_window(image, tmp_path)
    old, _ = make_image(stage=3, start_iteration=4)  # a window written before the kinds were recorded
    persist_window(old, tmp_path)
    rows = inspect_dir(tmp_path)
    assert [(r["expert_operators"], r["dense_operators"]) for r in rows] == [(12, 4), (None, None)]
    header, first, second = format_inspection(rows).splitlines()
    assert header.split()[6:8] == ["experts", "dense"] and first.split()[6:8] == ["12", "4"]
    assert second.split()[6:8] == ["?", "?"]
