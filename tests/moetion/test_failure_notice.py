"""The failure notice on real gloo groups: a rank blocked in a receive from a live, silent peer
abandons it as soon as a new generation is announced, with the notice as the reason."""
import os
import signal
import time

import pytest

from moetion import env, failure_notice
from moetion.control import ControlPlane, start_generation
from moetion.distributed import build_context, join_job, leave_process_group
from moetion.errors import PeerFailure
from moetion.launcher import run_workers, supervise_workers
from moetion.p2p import StageLinks

PEER_TIMEOUT_S = 4.0


def blocked_receiver() -> str:
    """Rank 2 receives from rank 1, which never sends; rank 0 announces generation 1 meanwhile."""
    rank = int(os.environ["RANK"])
    control = ControlPlane.from_env(timeout_s=30)
    failure_notice.start(control, rank)
    assert join_job(control, 0, timeout_s=30)
    context = build_context(num_stages=3, tied_stages={})
    outcome = "no failure"
    if rank == 0:
        time.sleep(1.0)  # rank 2 is in its receive by now
        control.announce_generation("rank 1 declared lost by the test", world_size=3)
    elif rank == 1:  # alive and paused, in the group, never sending: until rank 2 is done
        control.store.wait(["test/receiver-done"])
    else:
        links = StageLinks(prev_rank=1, next_rank=None, timeout_s=PEER_TIMEOUT_S, device=context.device)
        try:
            links.recv_activation(what="activation of micro-batch 0")
        except PeerFailure as failure:
            outcome = str(failure)
        control.store.set("test/receiver-done", "1")
    leave_process_group()
    return outcome


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_receive_from_a_live_peer_ends_with_the_notice_as_its_reason():
    reason = run_workers(blocked_receiver, nproc=3, timeout_s=90)[2]
    assert reason.startswith("generation 1 published (rank 1 declared lost by the test); abandoned the wait: "), reason
    assert "lost contact with rank 1 while receiving shape of activation of micro-batch 0" in reason


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_negative_control_without_the_notice_the_receive_waits_out_its_timeout():
    reason = run_workers(blocked_receiver, nproc=3, timeout_s=90, env={env.FAILURE_NOTICE: "0"})[2]
    assert "generation 1 published" not in reason
    assert f"no answer within {PEER_TIMEOUT_S:g} s" in reason, reason


REJOIN_TIMEOUT_S = 3.0


def survivor_the_notice_cannot_reach() -> dict:
    """Rank 0 dies once both have arrived; rank 1 survives it but does not rejoin for a while (as if
    stuck where its notice cannot reach, until its own peer timeout), its heartbeat beating on."""
    rank, generation = int(os.environ["RANK"]), start_generation()
    control = ControlPlane.from_env(timeout_s=30)
    control.start_heartbeat(rank, generation)
    if generation == 0:
        assert control.arrive(0, rank, 2, timeout_s=30)
        if rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(REJOIN_TIMEOUT_S + 5)
    assert control.arrive(1, rank, 2, timeout_s=30)
    return {"joined": control.generation()}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_survivor_that_does_not_rejoin_is_named_and_left_to_its_own_timeout(capsys):
    report = supervise_workers(survivor_the_notice_cannot_reach, nproc=2, recover=True,
                               rejoin_timeout_s=REJOIN_TIMEOUT_S, timeout_s=90)
    assert report.results == [{"joined": 1}, {"joined": 1}]
    assert [(r.generation, r.ranks, r.causes) for r in report.recoveries] == [(1, [0], {0: "killed by SIGKILL"})]
    out = capsys.readouterr().out
    assert f"rank 1 has not rejoined generation 1 {REJOIN_TIMEOUT_S:g} s after its failure notice" in out
    assert out.count("has not rejoined") == 1  # named once, not killed
