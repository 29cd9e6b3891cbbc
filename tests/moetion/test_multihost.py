"""Two launchers sharing one control store, as on two hosts: a rank of the second "host" is
SIGKILLed, its own supervisor replaces it, every rank of both hosts rebuilds around it, and the job
ends with the same losses and weights as a fault-free single-launcher run."""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recovering_script import recovering_script

pytestmark = pytest.mark.slow  # real ranks over gloo

SCRIPT = recovering_script(stages=4, iterations=9, tail='''
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in module.state_dict().values())).hexdigest()
    print(f"rank {engine.dist.rank} result " + json.dumps({"losses": engine.losses, "weights": digest}), flush=True)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(*outputs: str) -> dict[str, dict]:
    found = {}
    for out in outputs:
        for rank, payload in re.findall(r"rank (\d+) result (\{.*\})", out):
            found[rank] = json.loads(payload)
    return found


def launch(script, shm, *extra, env=None):
    command = [sys.executable, "-m", "moetion.cli", "launch", "--timeout", "400", *extra, str(script), str(shm)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def test_a_rank_of_the_second_host_is_replaced_and_the_job_stays_exact(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    reference = launch(script, tmp_path / "shm-ref", "--nproc", "4")
    out, err = reference.communicate(timeout=200)
    assert reference.returncode == 0, err
    expected = results(out)

    port = free_port()
    secret = {"MOETION_JOB_SECRET": secrets.token_hex(32)}  # the operator forwards one secret to every host
    hosts = [launch(script, tmp_path / "shm", "--nproc", "2", "--nnodes", "2", "--node-rank", str(node),
                    "--master-port", str(port), env={"MOETION_KILL": "stage=2,iter=5,phase=backward", **secret})
             for node in (0, 1)]
    outputs = [host.communicate(timeout=200) for host in hosts]
    for host, (out, err) in zip(hosts, outputs):
        assert host.returncode == 0, out + err
    assert "rank(s) [2] killed by SIGKILL; replaced" in outputs[1][0]  # the second host's supervisor
    got = results(*(out for out, _ in outputs))
    assert sorted(got) == sorted(expected) == ["0", "1", "2", "3"]
    for rank in expected:
        assert got[rank]["weights"] == expected[rank]["weights"], f"rank {rank} weights differ"
        if rank != "2":
            assert got[rank]["losses"] == expected[rank]["losses"]
    # The replacement knows the losses of the iterations it replayed (from the logs) and trained.
    replaced = got["2"]["losses"]
    assert "4" in replaced and replaced == {t: expected["2"]["losses"][t] for t in replaced}


LONG_SCRIPT = recovering_script(stages=4, iterations=400).replace(
    "    engine.train_batch(data)\n",
    "    engine.train_batch(data)\n"
    "    if engine.iteration == 3:\n"
    "        open(f'{sys.argv[1]}.rank{engine.dist.rank}-running', 'w').close()\n")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_lost_host_without_a_standby_ends_the_job_naming_the_host_and_the_resume_command(tmp_path):
    """Host 1's launcher and all its ranks are SIGKILLed: nothing can replace them, so host 0 ends
    the job through the control store once host 1's supervisor misses its heartbeats, instead of
    its ranks waiting for peer_timeout_s."""
    script = tmp_path / "train.py"
    script.write_text(LONG_SCRIPT)
    shm = tmp_path / "shm"
    port = free_port()
    env = {**os.environ, "MOETION_JOB_SECRET": secrets.token_hex(32)}  # the operator forwards one secret to every host
    hosts = [subprocess.Popen([sys.executable, "-m", "moetion.cli", "launch", "--timeout", "400", "--heartbeat-timeout",
                               "3", "--nproc", "2", "--nnodes", "2", "--node-rank", str(node), "--master-port", str(port),
                               str(script), str(shm)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
             for node in (0, 1)]
    deadline = time.monotonic() + 300
    while not Path(f"{shm}.rank2-running").exists():
        assert time.monotonic() < deadline and hosts[1].poll() is None, "host 1 never started training"
        time.sleep(0.2)
    os.killpg(hosts[1].pid, signal.SIGKILL)  # the launcher, its ranks and its spare: the whole host
    hosts[1].wait()
    out, err = hosts[0].communicate(timeout=300)
    assert hosts[0].returncode == 1, out + err
    assert "host 1 (ranks 2..3) stopped answering" in err, err
    assert (f"moetion launch --resume --nproc 2 --nnodes 2 --node-rank 1 --master-addr 127.0.0.1 "
            f"--master-port {port} {script} {shm}") in err, err
    assert "no answer within" not in err and "no new generation" not in err, err
