"""Two launchers sharing one control store, as on two hosts: a rank of the second "host" is
SIGKILLed and its own supervisor replaces it; later the whole second host is lost, and a standby
takes it over (or, without a standby, the job ends naming the host and the resume command)."""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from recovering_script import recovering_script

pytestmark = pytest.mark.slow  # real ranks over gloo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(*outputs: str, line: str = "result") -> dict[str, dict]:
    """Each rank's ``rank N <line> {json}`` record; ranks share the launcher's stdout, so a record
    may run into the next."""
    found, decoder = {}, json.JSONDecoder()
    for out in outputs:
        for match in re.finditer(rf"rank (\d+) {line} ", out):
            found[match.group(1)] = decoder.raw_decode(out, match.end())[0]
    return found


def launch(script, shm, *extra, env=None, session=False):
    """``moetion launch [extra] script shm [disk]`` (a ``Path`` in ``extra`` is a script argument)."""
    args = [str(a) for a in extra if isinstance(a, Path)]
    flags = [a for a in extra if not isinstance(a, Path)]
    command = [sys.executable, "-m", "moetion.cli", "launch", "--timeout", "400", *flags, str(script), str(shm), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=session)


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


STANDBY_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys, time, torch, moetion
    from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
    model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_hidden=16, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), 4, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 2, "upstream_log": {"enabled": True},
        "snapshot": {"enabled": True, "window": 2, "shm_dir": sys.argv[1], "persist_dir": sys.argv[2]}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    while engine.iteration < 8:
        engine.train_batch(data)
        pause = os.environ.get("TEST_PAUSE_MARKER")  # set for host 1's launcher only, not the standby's
        if pause and engine.iteration == 5:
            engine.checkpointer.drain(timeout_s=60)  # window 3..4 on disk: the chain of 2 and 3 has a common start
            print(f"rank {engine.dist.rank} paused " + json.dumps({"losses": engine.losses}), flush=True)
            open(f"{pause}.rank{engine.dist.rank}", "w").close()
            time.sleep(120)  # host 1 is killed here
    engine.close()
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in module.state_dict().values())).hexdigest()
    print(f"rank {engine.dist.rank} result " + json.dumps({"losses": engine.losses, "weights": digest}), flush=True)
''')


@pytest.mark.timeout(400)
def test_a_rank_of_a_host_is_replaced_then_a_standby_takes_over_the_lost_host_and_the_job_stays_exact(tmp_path):
    """Rank 2 (host 1) is SIGKILLed in iteration 3 and host 1's own supervisor replaces it; every
    rank of both hosts rebuilds around it and trains on exactly. Then host 1's launcher and ranks
    are SIGKILLed and its shared memory wiped; the standby claims node rank 1, its ranks restore
    from the peer replica and the persisted windows and replay, and every rank ends as in a
    fault-free run (one final check covering both recoveries)."""
    script = tmp_path / "train.py"
    script.write_text(STANDBY_SCRIPT)
    reference = launch(script, tmp_path / "shm-ref", tmp_path / "disk-ref", "--nproc", "4")
    out, err = reference.communicate(timeout=200)
    assert reference.returncode == 0, err
    expected = results(out)

    port, marker = free_port(), tmp_path / "paused"
    secret = {"MOETION_JOB_SECRET": secrets.token_hex(32)}  # the operator forwards one secret to every host
    host1_env = {**secret, "TEST_PAUSE_MARKER": str(marker), "MOETION_KILL": "stage=2,iter=3,phase=backward"}
    common = ["--heartbeat-timeout", "3", "--nproc", "2", "--nnodes", "2", "--master-port", str(port)]
    host0 = launch(script, tmp_path / "shm0", tmp_path / "disk", *common, "--node-rank", "0", env=secret)
    host1 = launch(script, tmp_path / "shm1", tmp_path / "disk", *common, "--node-rank", "1", env=host1_env,
                   session=True)
    standby = launch(script, tmp_path / "shm-standby", tmp_path / "disk", *common, "--standby", env=secret)
    deadline = time.monotonic() + 300
    while not all(Path(f"{marker}.rank{r}").exists() for r in (2, 3)):
        if host1.poll() is not None or time.monotonic() > deadline:
            for host in (host0, host1, standby):
                host.kill()
            pytest.fail("host 1 never reached the pause:\n" + "\n".join(h.communicate()[1][-3000:] for h in (host1, host0)))
        time.sleep(0.2)
    os.killpg(host1.pid, signal.SIGKILL)  # the launcher, its ranks and its spare: the whole host
    out1, _ = host1.communicate()
    shutil.rmtree(tmp_path / "shm1")  # its memory is gone with it
    (out0, err0), (out_s, err_s) = host0.communicate(timeout=300), standby.communicate(timeout=300)
    assert host0.returncode == 0, out0 + err0
    assert standby.returncode == 0, out_s + err_s

    # The first fault: host 1's own supervisor replaced rank 2, and host 1 trained on exactly.
    assert "rank(s) [2] killed by SIGKILL; replaced" in out1, out1
    paused = results(out1, line="paused")
    assert sorted(paused) == ["2", "3"]
    before_pause = {t: expected["3"]["losses"][t] for t in map(str, range(5))}
    assert paused["3"]["losses"] == before_pause
    # The replacement knows every loss so far: the job's history up to the fault (from the
    # recovery's history donor) and the losses of the iterations it trained since.
    assert paused["2"]["losses"] == before_pause

    # The second fault: the standby took over host 1, and every rank ends as in the fault-free run.
    assert "took over host 1" in out_s, out_s
    got = results(out0, out_s)
    assert sorted(got) == sorted(expected) == ["0", "1", "2", "3"]
    for rank in expected:
        assert got[rank]["weights"] == expected[rank]["weights"], f"rank {rank} weights differ"
    for rank in ("0", "1"):
        assert got[rank]["losses"] == expected[rank]["losses"]
