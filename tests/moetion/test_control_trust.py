"""Finding 1 of issue 19: the control store is bound to the job's address and only holders of the
job secret are believed. Strangers use real TCPStore clients, with no secret or a wrong one."""
import contextlib
import os
import signal
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from moetion.control import ControlPlane, serve_store, start_generation
from moetion.job_secret import derive, new_secret
from moetion.launcher import supervise_workers
from moetion.recovery.records import RecoveryEvents, Role
from moetion.signed_store import ForgedValue, SignedStore

HEARTBEAT_TIMEOUT_S = 3.0


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, port_hex = local.rsplit(":", 1)
                if state == "0A" and int(port_hex, 16) == port:
                    found.add(address)
    return found


def test_the_control_store_listens_on_loopback_only_for_a_one_host_job():
    process, port = serve_store(0, bind="127.0.0.1")
    try:
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 / ::
    finally:
        process.terminate()
        process.join()


def test_values_written_without_the_secret_are_refused_and_reads_never_raise():
    process, port = serve_store(0)
    try:
        secret = new_secret()
        job = ControlPlane("127.0.0.1", port, secret=secret, timeout_s=10)
        stranger = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                 timeout=timedelta(seconds=10))
        wrong = ControlPlane("127.0.0.1", port, secret=new_secret(), timeout_s=10)
        job.mark_ready(0, 0)
        stranger.set("fatal", "stop the job")
        assert job.fatal() is None
        wrong.declare_fatal("stop the job")
        assert job.fatal() is None
        stranger.set("generation", "7")
        stranger.add("heartbeat/0", 5)
        assert job.generation() == 0 and job.heartbeats([0]) == {0: None}
        assert job.new_generation() == 1 and job.generation() == 1
        stranger.set("generation", "9:forged")
        assert job.generation() == 1
        stranger.set("events/1/0", "{not json")
        wrong.record(1, 1, RecoveryEvents(Role.REPLACEMENT, resumed_at=9.0))
        job.record(1, 2, RecoveryEvents(Role.SURVIVOR, resumed_at=1.0))
        assert job.records(1, range(3)) == {2: RecoveryEvents(Role.SURVIVOR, resumed_at=1.0)}
        # gloo's rendezvous keys of a generation: a stranger's address is never handed to a rank
        stranger.set("gen1//rank_0", "10.0.0.66:1234")
        with pytest.raises(ForgedValue):
            job.group_store(1).get("rank_0")
        # an old signed value written back by a stranger does not move the job
        job.store.set("heartbeat/0", "0:5")
        old = job.raw.get("heartbeat/0")
        job.store.set("heartbeat/0", "0:6")
        stranger.set("heartbeat/0", old)
        assert job.heartbeats([0]) == {0: (0, 5)}  # seen as is, and the supervisor counts only growth
        # ...and its own declare_fatal still ends the job
        job.declare_fatal("rank 3 failed")
        assert job.fatal() == "rank 3 failed"
    finally:
        process.terminate()
        process.join()


def test_a_signed_store_verifies_what_it_reads():
    process, port = serve_store(0)
    try:
        raw = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
        store = SignedStore(raw, derive(new_secret(), "control-store"))
        store.set("a", b"value")
        assert store.get("a") == b"value" and store.multi_get(["a"]) == [b"value"]
        raw.set("a", b"x" * 40)
        with pytest.raises(ForgedValue):
            store.get("a")
    finally:
        process.terminate()
        process.join()


def _attacked_rank() -> dict:
    """Rank 0 attacks its own job's store as a stranger would; rank 1 beats once, then hangs."""
    rank = int(os.environ["RANK"])
    control = ControlPlane.from_env(timeout_s=30)
    if start_generation() > 0:
        return {"replacement": True}
    if rank == 1:
        control.start_heartbeat(1, start_generation())
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGSTOP)  # hung: only the heartbeat watch can tell
        return {}
    def stranger() -> dist.TCPStore:  # a fresh connection per write: the server drops one whose add fails
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             wait_for_workers=False, timeout=timedelta(seconds=10))

    wrong = ControlPlane(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), secret=new_secret(), timeout_s=10)
    stranger().set("fatal", "a stranger ends the job")
    wrong.declare_fatal("a wrong secret ends the job")
    stranger().add("generation", 5)
    for generation in range(1, 4):
        stranger().set(f"events/{generation}/0", "{not json")
    time.sleep(2.0)  # rank 1 has beaten (the supervisor watches it) and hangs now
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S + 6
    while time.monotonic() < deadline:  # fake rank 1's heartbeat every way a stranger can
        with contextlib.suppress(RuntimeError):
            stranger().add("heartbeat/1", 1)
        stranger().set("heartbeat/1", f"0:{int(time.monotonic() * 1000)}")
        time.sleep(0.1)
    return {"attacked": True}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stranger_cannot_kill_the_job_bump_the_generation_or_keep_a_hung_rank_alive():
    report = supervise_workers(_attacked_rank, nproc=2, recover=True, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
                               timeout_s=90)
    assert report.results[0] == {"attacked": True}  # the forged fatal did not end rank 0
    assert report.results[1] == {"replacement": True}
    assert [(r.generation, r.ranks, r.causes) for r in report.recoveries] == [
        (1, [1], {1: f"killed by SIGKILL (sent no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s)"})]
