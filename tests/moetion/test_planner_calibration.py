"""``moetion plan --calibrate``: measured fixed costs replace the preset's assumptions, and nothing else."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moetion.errors import ConfigError
from moetion.planner.calibration import load_calibration
from moetion.planner.presets import preset
from moetion.planner.report import build_rows

MEASURED = {"format": "moetion-calibration/1", "measured_on": "test", "iteration_s": 0.5,
            "detect_s": 0.1, "respawn_s": 0.2, "rejoin_s": 1.0, "script_s": 0.3, "load_s": 0.2, "logs_s": 0.2,
            "replay_iterations_per_s": 6.0, "restart_s": 9.0, "overhead_fraction": 0.001}


def _write(tmp_path, data) -> str:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_measured_costs_replace_the_assumed_ones(tmp_path):
    calibration = load_calibration(_write(tmp_path, MEASURED))
    assert calibration.fixed_recovery_s == pytest.approx(2.0)
    assert calibration.replay_speedup == pytest.approx(3.0)
    model, hardware = preset("deepseek-moe-16b")
    plain = {r.approach: r for r in build_rows(model, hardware, mtbf_s=600, runs=0)}
    tuned = {r.approach: r for r in build_rows(model, hardware, mtbf_s=600, runs=0, calibration=calibration)}
    sparse = tuned["moevement"]
    t, w = hardware.iteration_s, sparse.interval
    wall = t * (1 + 0.001)
    assert sparse.overhead_pct == pytest.approx(0.1)
    assert sparse.expected_recovery_s == pytest.approx(2.0 + (w + w / 2) * wall / 3.0)
    assert sparse.expected_recovery_s != pytest.approx(plain["moevement"].expected_recovery_s)
    assert tuned["checkfreq"].expected_recovery_s == pytest.approx(plain["checkfreq"].expected_recovery_s - 120.0 + 9.0)


def test_fields_left_out_keep_the_preset(tmp_path):
    calibration = load_calibration(_write(tmp_path, {"format": "moetion-calibration/1"}))
    model, hardware = preset("deepseek-moe-16b")
    plain = build_rows(model, hardware, mtbf_s=600, runs=0)
    assert build_rows(model, hardware, mtbf_s=600, runs=0, calibration=calibration) == plain


@pytest.mark.parametrize("data, match", [
    ({"format": "other"}, "expected 'moetion-calibration/1'"),
    ({**MEASURED, "load_s": -1}, "'load_s' must be a finite number >= 0"),
    ({**MEASURED, "restart_s": "fast"}, "'restart_s' must be a finite number"),
])
def test_bad_calibration_files(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_calibration(_write(tmp_path, data))


def test_cli_prints_the_calibrated_table(tmp_path):
    done = subprocess.run([sys.executable, "-m", "moetion.cli", "plan", "--preset", "deepseek-moe-16b", "--mtbf", "10m",
                           "--runs", "0", "--calibrate", _write(tmp_path, MEASURED)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "calibrated (fixed_recovery_s=2" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "moetion.cli", "plan", "--preset", "deepseek-moe-16b", "--mtbf", "10m",
                              "--calibrate", str(tmp_path / "absent.json")], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and missing.stderr.startswith("moetion plan: error: cannot read calibration file")
