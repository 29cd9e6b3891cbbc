"""The initial state is part of exactness (issue 17, item 8): a stage built with non-finite weights is
refused, and a rebuild of a stage whose uninitialised weights came out different (the reference, a
replacement replaying from before the first window, a data-parallel replica) is caught by the
initial-state digest."""
import itertools
import logging
import re

import pytest
import torch
from torch import nn

import moetion
from moetion import initial_state
from moetion.control import ControlPlane, serve_store
from moetion.errors import ConfigError, LaunchError
from moetion.harness.final_state import compare_runs
from moetion.harness.runner import FaultHarness, Job
from moetion.job_secret import new_secret
from moetion.launcher import run_workers
from moetion.reference import train_reference
from moetion.replay import replay_stage
from moetion.upstream_log import LogReader

import layout_models as models
from layout_script import layout_script

_builds = itertools.count()


class LeftoverNaN(nn.Module):
    """A weight allocated with ``torch.empty`` and never initialised. What the allocator hands out is
    not reproducible, so the test puts a NaN where leftover memory may hold one."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(models.D_MODEL, models.D_MODEL)
        self.scale = nn.Parameter(torch.empty(models.D_MODEL))
        self.scale.data[3] = float("nan")

    def forward(self, x):
        return self.lin(x) * self.scale


class LeftoverFinite(LeftoverNaN):
    """Finite leftover memory that differs in every build (and every process), as torch.empty's does."""

    def __init__(self):
        super().__init__()
        self.scale.data.fill_(1.0 + next(_builds))


class UninitialisedEmpty(LeftoverNaN):
    """The real thing: torch.empty, nothing written to it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(4096))

    def forward(self, x):
        return self.lin(x) * self.scale[: x.shape[-1]]


def stage(cls, stage_id=0):
    return moetion.PipelineModule([moetion.LayerSpec(nn.Linear, models.D_MODEL, models.D_MODEL), moetion.LayerSpec(cls)],
                                  2, loss_fn=models.mse, partition_method="uniform", stage_id=stage_id)


def reference(cls, digests):
    return train_reference(layers=[moetion.LayerSpec(nn.Linear, models.D_MODEL, models.D_MODEL), moetion.LayerSpec(cls)],
                           num_stages=2, loss_fn=models.mse, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                           config=moetion.Config.from_dict({"micro_batches": 2}), data=models.RegressionData(),
                           iterations=1, partition_method="uniform", initial_digests=digests)


def test_a_stage_whose_weights_are_not_finite_after_building_is_refused_naming_them():
    with pytest.raises(ConfigError, match=r"stage 1: parameter\(s\) layers\.1\.scale hold non-finite values.*torch\.empty"):
        stage(LeftoverNaN, 1)
    stage(LeftoverNaN, 0)  # stage 0 does not hold the layer
    big = nn.Linear(4, 4).half()
    big.weight.data.fill_(60000.0)  # finite, though its sum overflows fp16
    initial_state.check_finite(big, where="fp16")


def test_the_reference_catches_a_stage_whose_uninitialised_weights_differ_from_the_pipelines():
    digests = [stage(nn.Identity, 0).initial_digest, stage(LeftoverFinite, 1).initial_digest]
    with pytest.raises(ConfigError, match=r"reference's stage 1: parameter layers\.1\.scale differs from the initial "
                                          r"state.*never initialises it"):
        reference(LeftoverFinite, digests)
    same = [stage(nn.Identity, 0).initial_digest, stage(models.GroupedMoE, 1).initial_digest]
    assert len(reference(models.GroupedMoE, same).losses) == 1  # a layer that initialises its weights passes


def test_a_replay_from_the_initial_state_checks_the_rebuilt_stage():
    recorded = stage(LeftoverFinite, 1).initial_digest
    rebuilt = stage(LeftoverFinite, 1)
    with pytest.raises(ConfigError, match=r"replay of stage 1 from the initial state: parameter layers\.1\.scale differs"):
        replay_stage(module=rebuilt, optimizer=torch.optim.SGD(rebuilt.parameters(), lr=0.1),
                     config=moetion.Config(), window=None, logs=LogReader({}, stage=1),
                     data=models.RegressionData(), until=0, initial_digest=recorded)


def test_a_real_torch_empty_weight_is_refused_caught_or_reproducible():
    """Whatever leftover memory the allocator hands out, a rebuild never silently differs."""
    builds = []
    for _ in range(3):
        try:
            builds.append(stage(UninitialisedEmpty, 1))
        except ConfigError as error:
            assert "layers.1.scale" in str(error)
    for later in builds[1:]:
        try:
            initial_state.check_initial(later, later.initial_digest, builds[0].initial_digest, where="rebuild")
        except ConfigError as error:
            assert "layers.1.scale differs" in str(error)
        else:
            assert all(torch.equal(a, b) for a, b in zip(later.state_dict().values(), builds[0].state_dict().values()))


def test_the_fault_harness_verdict_says_when_two_runs_started_from_different_bits():
    def final(module):
        return {0: {"iteration": 1, "model": module.state_dict(), "optimizer": {}, "lr_scheduler": None,
                    "losses": {0: 1.0}, "buffers": [], "initial_digest": module.initial_digest}}
    verdict = compare_runs(final(stage(LeftoverFinite, 1)), final(stage(LeftoverFinite, 1)))
    assert not verdict.identical and verdict.summary().startswith("MISMATCH to the fault-free run: INITIAL STATES DIFFER")
    assert verdict.mismatches[0].startswith("rank 0: started from other bits than the reference (layers.1.scale "
                                            "differs): the layer probably allocates it with torch.empty")
    same = stage(models.GroupedMoE, 1)
    assert compare_runs(final(same), final(same)).identical


def test_the_digest_travels_through_the_control_store_signed(caplog):
    process, port = serve_store(0)
    try:
        control = ControlPlane("127.0.0.1", port, secret=new_secret(), timeout_s=10)
        built = stage(models.DeclaredMoE, 1).initial_digest
        control.record_initial_digest(3, initial_state.encode(built))
        assert initial_state.decode(control.initial_digest(3), source="test") == built
        assert control.initial_digest(4) is None
        with caplog.at_level(logging.WARNING, logger="moetion.initial_state"):
            assert initial_state.decode(b'{"w": "x"}', source="rank 5") is None
        assert "rank 5: the recorded initial-state digest is malformed" in caplog.text
    finally:
        process.terminate()
        process.join()


def build_and_initialize():
    module = moetion.PipelineModule([moetion.LayerSpec(models.LeftoverPerProcess), moetion.LayerSpec(models.LeftoverPerProcess)],
                                    2, loss_fn=models.mse, partition_method="uniform")
    moetion.initialize(module, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                       config={"micro_batches": 2, "threads": 1, "peer_timeout_s": 30})


@pytest.mark.slow  # real ranks over gloo
def test_data_parallel_replicas_built_to_different_bits_are_refused_at_start_up():
    with pytest.raises(LaunchError, match=r"stage \d, replica 1: parameter layers\.\d\.scale differs from replica 0's"):
        run_workers(build_and_initialize, nproc=4, timeout_s=120)


@pytest.mark.slow  # real ranks under the supervisor
def test_a_replacement_whose_rebuilt_initial_state_differs_stops_with_the_cause(tmp_path, capfd):
    """Killed before the first window completed, stage 1 is replaced and must replay from the initial
    state, which its process builds to other bits: it stops naming the parameter, not diverging."""
    script = tmp_path / "train.py"
    script.write_text(layout_script(layers="leftover_layers", stages=2, iterations=2, window=3))
    harness = FaultHarness(Job(script=str(script), script_args=[str(tmp_path / "shm")], nproc=2),
                           work_dir=tmp_path / "faults", timeout_s=400)
    with pytest.raises(LaunchError, match="rank 1: exited with code 1"):
        harness.run(["stage=1,iter=1,phase=forward"])
    assert re.search(r"ConfigError: replay of stage 1 from the initial state: parameter layers\.2\.scale differs "
                     r"from the initial state the job started from", capfd.readouterr().err)
