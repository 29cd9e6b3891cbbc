"""`moetion faults` on a user's training script: replacements are fresh interpreters started by the
supervisor (as under `moetion launch`), and the verdict is the process's exit status."""
import json
import subprocess
import sys

import pytest

from recovering_script import recovering_script

pytestmark = pytest.mark.slow  # real ranks over gloo

SCRIPT = recovering_script(stages=2, iterations=9)


def faults(tmp_path, *kills):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "moetion.cli", "faults", "--script", str(script), "--nproc", "2",
               "--json", str(tmp_path / "report.json")]
    for kill in kills:
        command += ["--kill", kill]
    return subprocess.run(command + ["--", str(tmp_path / "shm")], capture_output=True, text=True, timeout=240)


def test_a_script_killed_mid_backward_recovers_bit_identically(tmp_path):
    result = faults(tmp_path, "stage=1,iter=5,phase=backward")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BIT-IDENTICAL to the fault-free run" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    (timeline,) = report["timelines"]
    assert report["identical"] and timeline["sources"] == {"1": "shm"} and timeline["survivor_lost_iterations"] == 0
    assert timeline["replayed_stage_iterations"] >= 1


def test_a_bad_kill_spec_is_a_clear_error(tmp_path):
    result = faults(tmp_path, "stage=1,iter=5,phase=lunch")
    assert result.returncode == 2 and "phase must be one of" in result.stderr
