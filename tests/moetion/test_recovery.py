"""Localized recovery from real SIGKILLs, each case bit-identical to the fault-free run.

Each test runs the built-in GPT-MoE pipeline (real processes, real gloo groups) under the
recovering supervisor through the fault harness, which compares every rank's final weights, full
optimizer state and every iteration's loss with ``torch.equal`` / exact floats. Snapshot window
W=3: windows 1..3, 4..6, 7..9, 10..12, 13..15 (captures and replication fire at window ends).
"""
import dataclasses

import pytest

from moetion.demo import DemoSettings
from moetion.errors import LaunchError
from moetion.harness.runner import FaultHarness, Job
from moetion import replay
from moetion.iteration import StepHooks

pytestmark = pytest.mark.slow  # real ranks over gloo

ITERATIONS = 16


def settings(**overrides) -> DemoSettings:
    values = dict(iterations=ITERATIONS, window=3, progress=False, lr=1e-2, micro_batch_size=2, micro_batches=2)
    values.update(overrides)
    return DemoSettings(**values)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return FaultHarness(Job(demo=settings()), work_dir=tmp_path_factory.mktemp("faults"), timeout_s=400)


def assert_identical(report, *, sources):
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert [s for t in restored for s in t.sources.values()] == sources
    assert all(t.survivor_lost_iterations == 0 for t in restored)
    return restored


def test_first_last_and_middle_stage_at_forward_step_and_capture(pipeline):
    """Three faults in one run: stage 0 before any window completed (replay from the initial
    state), the last stage after the commit point, stage 1 while publishing a window (its shared
    memory still holds the previous one, and its neighbours kept the logs for it)."""
    report = pipeline.run(["stage=0,iter=2,phase=forward", "stage=3,iter=7,phase=step",
                           "stage=1,iter=12,phase=capture"])
    restored = assert_identical(report, sources=["initial", "shm", "shm"])
    assert all(t.replayed_stage_iterations > 0 for t in restored)


def test_middle_stage_at_backward_with_host_memory_lost_then_another_at_replication(pipeline):
    """The peer's replica serves a stage whose shared memory is gone; then a stage dies while
    sending its window replica (the receiver keeps its previous one)."""
    report = pipeline.run(["stage=2,iter=8,phase=backward,memory=lost", "stage=1,iter=12,phase=replication"])
    assert_identical(report, sources=["peer", "shm"])


def test_a_stage_lost_after_the_last_commit_is_restored_while_the_others_finish(pipeline):
    report = pipeline.run([f"stage=3,iter={ITERATIONS - 1},phase=step"])
    assert_identical(report, sources=["shm"])


def test_the_loss_record_survives_every_stage_being_replaced(pipeline):
    """Each replacement replays only from its window (iterations 2..), so before it received the
    job's loss history the losses of iterations 0 and 1 died with the last rank that trained them."""
    report = pipeline.run(["stage=0,iter=5,phase=forward", "stage=1,iter=6,phase=backward",
                           "stage=2,iter=7,phase=step", "stage=3,iter=8,phase=forward"])
    assert_identical(report, sources=["shm"] * 4)
    assert report.verdict.iterations == ITERATIONS


def test_replacement_killed_during_its_replay_restarts_the_recovery(pipeline):
    report = pipeline.run(["stage=1,iter=10,phase=backward", "stage=1,iter=8,phase=replay"])
    assert report.verdict.identical, "\n".join(report.lines())
    assert [t.superseded for t in report.timelines] == [True, False]


def test_persistence_fault_then_memory_lost_without_replicas_restores_from_disk(tmp_path):
    harness = FaultHarness(Job(demo=settings(persist_dir=str(tmp_path / "persist"), replicate=False)),
                           work_dir=tmp_path / "faults", timeout_s=400)
    report = harness.run(["stage=2,iter=6,phase=persistence", "stage=1,iter=11,phase=forward,memory=lost"])
    assert_identical(report, sources=["shm", "disk"])


def test_data_parallel_heals_from_the_live_replica_bf16_and_a_hung_rank(tmp_path):
    harness = FaultHarness(Job(demo=settings(stages=2, data_parallel=2, precision="bf16")),
                           work_dir=tmp_path, timeout_s=400, heartbeat_timeout_s=3)
    report = harness.run(["stage=1,iter=5,phase=backward,replica=1", "stage=0,iter=11,phase=forward,signal=stop"])
    assert_identical(report, sources=["replica", "replica"])


def test_adjacent_stages_lost_together_replay_as_a_chain(pipeline):
    """Both die after the commit point of iteration 9; each replays with the other's live outputs."""
    report = pipeline.run(["stage=1,iter=9,phase=step", "stage=2,iter=9,phase=step"])
    restored = [t for t in report.timelines if not t.superseded]
    assert report.verdict.identical, "\n".join(report.lines())
    assert sorted(restored[-1].sources) == [1, 2]


def test_memory_lost_without_any_other_copy_names_what_is_missing(tmp_path):
    harness = FaultHarness(Job(demo=settings(replicate=False)), work_dir=tmp_path, timeout_s=400)
    with pytest.raises(LaunchError, match=r"rank 2 \(stage 2, replica 0\) cannot be restored exactly: rank 2 holds "
                                          r"the initial state; the initial state needs logs of iterations 0\.\.9.*"
                                          r"no window of it was persisted"):
        harness.run(["stage=2,iter=10,phase=backward,memory=lost"])


def test_faults_during_recovery_two_stages_in_one_iteration_then_a_survivor_killed_while_paused(pipeline):
    """Stages 0 and 2 (not adjacent) die in the same iteration; later, while the job is rebuilt
    around stage 1, stage 3 dies paused: its recovery starts over with both."""
    report = pipeline.run(["stage=0,iter=5,phase=forward", "stage=2,iter=5,phase=forward",
                           "stage=1,iter=11,phase=backward", "stage=3,iter=11,phase=paused"])
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert sorted(stage for t in restored for stage in t.sources) == [0, 1, 2, 3]


def test_faults_during_recovery_a_log_sender_mid_transfer_then_the_only_replica_holder(tmp_path):
    """Stage 1 dies after announcing the size of the logs it owes stage 2's replacement (that
    recovery fails and starts over, replaying 1 and 2 as a chain); later stage 3, holding the only
    replica of stage 2's window, dies paused before stage 2's replacement read it: the window
    comes from disk, where windows are delta-compressed."""
    harness = FaultHarness(Job(demo=settings(persist_dir=str(tmp_path / "persist"), persist_codec="lz4")),
                           work_dir=tmp_path / "faults", timeout_s=400)
    report = harness.run(["stage=2,iter=5,phase=backward", "stage=1,iter=5,phase=handover",
                          "stage=2,iter=11,phase=backward,memory=lost", "stage=3,iter=11,phase=paused"])
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert [sorted(t.sources) for t in restored] == [[1, 2], [2, 3]]
    assert restored[-1].sources[2] == "disk"
    persisted = tmp_path / "persist"
    assert list(persisted.rglob("blob.delta")) and not list(persisted.rglob("blob.bin"))


@pytest.fixture
def replay_fault():
    """Injects a fault into every replay of the ranks the test forks, through the public port hook."""
    yield replay.adapt_replay_ports
    replay.clear_replay_port_adapters()


class _NeverPromoted(StepHooks):
    """Frozen operators never get their full snapshots: the replica is not the lost state."""


class _PerturbedActivation:
    def __init__(self, inputs):
        self.inputs = inputs

    def activation(self, iteration, micro_batch):
        x = self.inputs.activation(iteration, micro_batch)
        return x + 1e-3 if (iteration, micro_batch) == (6, 1) else x

    def gradient(self, iteration, micro_batch, like):
        return self.inputs.gradient(iteration, micro_batch, like)


class _WrongLR:
    def __init__(self, decisions):
        self.decisions = decisions

    def reduce_tied(self, iteration, key, params):
        self.decisions.reduce_tied(iteration, key, params)

    def decide(self, iteration, **kwargs):
        return dataclasses.replace(self.decisions.decide(iteration, **kwargs), lr_factor=0.5)


@pytest.mark.parametrize("fault", [
    lambda ports: dataclasses.replace(ports, hooks=_NeverPromoted()),
    lambda ports: dataclasses.replace(ports, inputs=_PerturbedActivation(ports.inputs)),
    lambda ports: dataclasses.replace(ports, decisions=_WrongLR(ports.decisions)),
], ids=["frozen-slots-never-promoted", "perturbed-logged-activation", "wrong-logged-lr-factor"])
def test_negative_control_a_faulty_replay_makes_the_harness_report_a_mismatch(pipeline, replay_fault, fault):
    replay_fault(fault)
    report = pipeline.run(["stage=2,iter=8,phase=backward"])
    assert not report.verdict.identical and not report.verdict.weights_equal
