"""The control store dies mid-run: it cannot be restarted under a running job (it holds the
generations), so the job ends at once with a clear error instead of hanging."""
import subprocess
import sys

import pytest

from recovering_script import recovering_script

KILL_STORE = '''
import os, signal
from pathlib import Path
def kill_control_store():
    """SIGKILLs the control store this rank's launcher serves (a sibling named moetion-store)."""
    for pid in os.listdir("/proc"):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if name == "moetion-store" and parent == os.getppid():
            os.kill(int(pid), signal.SIGKILL)
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_lost_control_store_stops_the_job_with_a_clear_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_STORE + recovering_script(stages=2, iterations=400).replace(
        "    engine.train_batch(data)\n",
        "    engine.train_batch(data)\n"
        "    if engine.iteration == 3 and engine.dist.rank == 0:\n"
        "        kill_control_store()\n"))
    result = subprocess.run([sys.executable, "-m", "moetion.cli", "launch", "--nproc", "2", "--timeout", "400",
                             str(script), str(tmp_path / "shm")], capture_output=True, text=True, timeout=280)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "moetion launch: error: the job's control store at 127.0.0.1:" in result.stderr, result.stderr
    assert "stopped answering" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr.split("moetion launch: error:")[1].split("\n")[0]
