"""Bad input and dead peers end in clear errors that name the cause, never in a hang."""
import os
import signal
import time

import pytest
import torch

import moetion
from moetion.control import ControlPlane
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss

pytestmark = pytest.mark.slow  # real ranks over gloo

MODEL = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_hidden=16, num_experts=2)


def train(num_stages: int, iterations: int, data=None, *, peer_timeout_s: float = 60.0,
          fault: tuple[int, int, signal.Signals] | None = None) -> None:
    """Trains the small model; ``fault=(rank, iteration, signal)`` makes that rank signal itself."""
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), num_stages, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                                config={"micro_batches": 2, "threads": 1, "peer_timeout_s": peer_timeout_s})
    data = data or moetion.ByteCorpus(bytes(range(256)) * 4, seq_len=MODEL.seq_len, micro_batch_size=2)
    for iteration in range(iterations):
        if fault and fault[0] == engine.dist.rank and fault[1] == iteration:
            os.kill(os.getpid(), fault[2])
        engine.train_batch(data)


def test_killed_stage_is_named_by_its_neighbours():
    with pytest.raises(moetion.LaunchError) as failure:
        run_workers(_train_with_fault, nproc=3, args=(3, 5, (1, 2, signal.SIGKILL), 60.0), timeout_s=60, grace_s=5)
    report = str(failure.value)
    assert report.index("rank 1: killed by SIGKILL") < report.index("PeerFailure")
    assert "lost contact with rank 1" in report


def test_hung_stage_is_caught_by_the_bounded_wait():
    """A SIGSTOPped rank never closes its sockets; only the peer timeout can name it."""
    with pytest.raises(moetion.LaunchError) as failure:
        run_workers(_train_with_fault, nproc=2, args=(2, 4, (1, 1, signal.SIGSTOP), 5.0), timeout_s=60, grace_s=2)
    report = str(failure.value)
    assert "lost contact with rank 1" in report and "no answer within 5 s" in report


def test_data_that_cannot_supply_an_iteration_is_named():
    inputs = torch.randint(0, 256, (8, MODEL.seq_len))
    data = moetion.TensorDataSource(inputs, inputs, micro_batch_size=2, micro_batches_per_iteration=2)
    with pytest.raises(moetion.LaunchError) as failure:
        run_workers(train, nproc=2, args=(2, 3, data), timeout_s=60, grace_s=5)
    assert "DataError: the data holds 2 iterations" in str(failure.value)


def test_world_size_must_be_a_multiple_of_the_stages():
    with pytest.raises(moetion.LaunchError) as failure:
        run_workers(train, nproc=3, args=(2, 1), timeout_s=60, grace_s=5)
    assert "not divisible by num_stages=2" in str(failure.value)


def test_last_stage_needs_a_loss():
    def no_loss():
        module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 1)
        moetion.initialize(module, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))

    with pytest.raises(moetion.LaunchError, match="the last stage needs a loss"):
        run_workers(no_loss, nproc=1, timeout_s=60)


def _train_with_fault(num_stages, iterations, fault, peer_timeout_s):
    train(num_stages, iterations, peer_timeout_s=peer_timeout_s, fault=fault)


@pytest.mark.parametrize("phase", ["forward", "backward", "step"])
def test_kill_spec_kills_the_named_stage_at_the_named_phase(monkeypatch, phase):
    monkeypatch.setenv("MOETION_KILL", f"stage=1,iter=2,phase={phase}")
    with pytest.raises(moetion.LaunchError) as failure:
        run_workers(train, nproc=3, args=(3, 4), timeout_s=60, grace_s=3)
    report = str(failure.value)
    assert report.index("rank 1: killed by SIGKILL") < report.index("PeerFailure")


def _die_after_every_rank_finished() -> None:
    control = ControlPlane.from_env(timeout_s=30.0)
    control.mark_done(0, int(os.environ["RANK"]))  # what a closed engine leaves
    if int(os.environ["RANK"]) == 1:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(8.0)  # rank 0 is still exiting when rank 1 dies


def test_a_rank_lost_after_every_rank_finished_ends_the_job_at_once():
    """No replacement: it would wait for peers that are leaving (the job would hang to its timeout)."""
    started = time.monotonic()
    with pytest.raises(moetion.LaunchError, match=r"rank\(s\) \[1\] killed by SIGKILL after every rank had finished"):
        run_workers(_die_after_every_rank_finished, nproc=2, recover=True, timeout_s=120, grace_s=2)
    assert time.monotonic() - started < 60, "the supervisor waited for a replacement that could not recover"
