"""Model code that draws from torch's own generators, under activation checkpointing, replays exactly.

The models (tests/moetion/torch_random_models.py) use ``nn.Dropout``, ``F.dropout``, ``torch.rand``
noise, a router with ``torch.rand`` jitter and moetion's Dropout, each block optionally under
``torch.utils.checkpoint`` (non-reentrant, reentrant, selective). The "mixed" model puts every
checkpoint mode on every stage, so one run covers each mode at each stage.
"""
import textwrap
from pathlib import Path

import pytest
import torch

import moetion
from moetion.config import Config
from moetion.determinism import Pass, enable_strict_mode, unit_of_work
from moetion.errors import ConfigError, LaunchError, NondeterministicOpError
from moetion.harness.runner import FaultHarness, Job
from moetion.launcher import run_workers
from moetion.reference import train_reference
from torch_random_models import CHECKPOINTS, build_layers, build_module, data, loss_fn, optimizer

HERE = Path(__file__).resolve().parent
PARTITION = "type:DropoutBlock|JitterRouter"
MIXED = CHECKPOINTS  # every stage: blocks without checkpointing and under each of the three modes
BREAK_ENV = "TEST_REPLACEMENT_LEAVES_TORCH_GENERATORS"


def config(**determinism) -> Config:
    return Config.from_dict({"seed": 7, "micro_batches": 2, "threads": 1, "grad_clip": 0.5,
                             "determinism": determinism})


def draws(**coordinates) -> torch.Tensor:
    with unit_of_work(config(), **coordinates):
        return torch.rand(8)


# -- units of work (in process) -------------------------------------------------------------------
def test_a_unit_draws_from_its_coordinates_only_and_gives_the_generator_back():
    unit = dict(stage=1, iteration=4, micro_batch=3, pass_=Pass.FORWARD)
    torch.manual_seed(1)
    first = draws(**unit)
    after = torch.rand(4)
    torch.manual_seed(2)  # what the process drew before must not matter
    assert torch.equal(draws(**unit), first)
    torch.manual_seed(1)
    draws(**unit)
    assert torch.equal(torch.rand(4), after), "the caller's generator state was not restored"
    others = [dict(unit, stage=2), dict(unit, iteration=5), dict(unit, micro_batch=2), dict(unit, pass_=Pass.BACKWARD)]
    assert all(not torch.equal(draws(**other), first) for other in others)


def test_with_torch_generators_off_draws_follow_the_process_history():
    unit = dict(stage=0, iteration=0, micro_batch=0, pass_=Pass.FORWARD)
    with unit_of_work(config(torch_generators=False), **unit):
        torch.manual_seed(1)
        first = torch.rand(8)
    assert not torch.equal(draws(**unit), first)


def test_checkpointed_blocks_train_bit_identically_to_plain_ones():
    """Recomputation in backward sees exactly the forward's draws, torch's and moetion's, in all
    three modes: checkpointing changes memory, never the result."""
    def train(mode):
        run = train_reference(layers=build_layers((mode,), stages=2), num_stages=2, loss_fn=loss_fn,
                              optimizer=optimizer, config=config(), data=data(), iterations=2,
                              partition_method=PARTITION, module_seed=5)
        return run.losses, [stage.state_dict() for stage in run.stages]

    plain_losses, plain_states = train("none")
    for mode in CHECKPOINTS[1:]:
        losses, states = train(mode)
        assert losses == plain_losses, mode
        for plain, state in zip(plain_states, states):
            assert all(torch.equal(plain[k], state[k]) for k in plain), mode


def test_strict_mode_names_the_op_and_the_unit():
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        enable_strict_mode(config(strict=True).determinism)
        with pytest.raises(NondeterministicOpError, match=r"^put_ has no deterministic implementation on cpu "
                                                           r"\(stage 2, iteration 0, micro-batch 1, backward\)"):
            with unit_of_work(config(strict=True), stage=2, iteration=0, micro_batch=1, pass_=Pass.BACKWARD):
                torch.zeros(4).put_(torch.tensor([1]), torch.tensor([1.0]))
        with pytest.raises(RuntimeError, match="boom"):  # any other error passes through unchanged
            with unit_of_work(config(strict=True), stage=0, iteration=0, micro_batch=0, pass_=Pass.FORWARD):
                raise RuntimeError("boom")
    finally:
        torch.use_deterministic_algorithms(previous)


def test_determinism_keys_are_typed():
    with pytest.raises(ConfigError, match="determinism.strict must be true or false"):
        config(strict="yes")
    with pytest.raises(ConfigError, match="unknown config key 'determinism.seed_everything'"):
        Config.from_dict({"determinism": {"seed_everything": True}})


# -- pipeline against the single-process reference ------------------------------------------------
ITERATIONS = 3


def pipeline_rank(checkpoints) -> dict:
    module = build_module(checkpoints, stages=3)
    engine = moetion.initialize(module, optimizer=optimizer, config=config())
    source = data()
    losses = [engine.train_batch(source) for _ in range(ITERATIONS)]
    return {"stage": engine.stage, "losses": losses, "model": module.state_dict(),
            "optim": engine.optimizer.state_dict()["state"]}


def reference_rank(checkpoints) -> dict:
    run = train_reference(layers=build_layers(checkpoints, stages=3), num_stages=3, loss_fn=loss_fn,
                          optimizer=optimizer, config=config(), data=data(), iterations=ITERATIONS,
                          partition_method=PARTITION, module_seed=5)
    return {"losses": run.losses, "models": [s.state_dict() for s in run.stages],
            "optims": [o.state_dict()["state"] for o in run.optimizers]}


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [("none",), MIXED], ids=["plain", "mixed-checkpointing"])
def test_pipeline_equals_single_process_reference(checkpoints):
    ranks = run_workers(pipeline_rank, nproc=3, args=(checkpoints,), timeout_s=180)
    expected = run_workers(reference_rank, nproc=1, args=(checkpoints,), timeout_s=180)[0]
    for rank in ranks:
        stage = rank["stage"]
        assert rank["losses"] == expected["losses"], f"stage {stage}"
        model, optim = expected["models"][stage], expected["optims"][stage]
        assert all(torch.equal(rank["model"][k], model[k]) for k in model), f"stage {stage} weights"
        assert rank["optim"].keys() == optim.keys()
        for index, state in optim.items():
            assert all(torch.equal(rank["optim"][index][k], v) for k, v in state.items()), f"stage {stage} optimizer"


def strict_rank() -> float:
    module = build_module(("none",), stages=2)
    if module.stage_id == 1:  # a layer torch has no deterministic CPU kernel for, on the last stage
        module.register_forward_hook(lambda _m, _i, out: out.clone().put_(torch.tensor([0]), out.reshape(-1)[:1]))
    engine = moetion.initialize(module, optimizer=optimizer, config={"micro_batches": 2, "determinism": {"strict": True}})
    return engine.train_batch(data())


@pytest.mark.slow
def test_strict_mode_refuses_a_cublas_workspace_that_is_not_reproducible(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    previous = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG unset or one of .* found ':0:0'"):
        enable_strict_mode(config(strict=True).determinism)
    assert torch.are_deterministic_algorithms_enabled() == previous  # refused before switching anything


def test_strict_mode_stops_the_first_iteration_naming_the_op():
    """``Tensor.put_`` (accumulate=False) has no deterministic implementation on CPU in torch 2.13."""
    with pytest.raises(LaunchError, match=r"NondeterministicOpError: put_ has no deterministic implementation "
                                          r"on cpu \(stage 1, iteration 0, micro-batch 0, forward\)"):
        run_workers(strict_rank, nproc=2, timeout_s=120)


# -- SIGKILLs under the supervisor, replacements from warm spares or fresh interpreters -------------
SCRIPT = textwrap.dedent(f'''
    import os, sys
    sys.path.insert(0, {str(HERE)!r})
    import moetion
    from moetion.control import start_generation
    from torch_random_models import build_module, data, optimizer
    config = {{"seed": 7, "micro_batches": 2,
              "snapshot": {{"enabled": True, "window": 2, "shm_dir": sys.argv[1]}}, "upstream_log": {{"enabled": True}}}}
    if os.environ.get({BREAK_ENV!r}) and start_generation() > 0:  # the negative control's replacement
        config["determinism"] = {{"torch_generators": False}}
    engine = moetion.initialize(build_module({MIXED!r}, stages=3), optimizer=optimizer, config=config)
    source = data()
    while engine.iteration < 8:
        engine.train_batch(source)
    engine.close()
''')


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("torch-random") / "train.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def harness(script, tmp_path_factory):
    shm = tmp_path_factory.mktemp("shm")
    return FaultHarness(Job(script=str(script), script_args=[str(shm)], nproc=3),
                        work_dir=tmp_path_factory.mktemp("faults"), timeout_s=420)


@pytest.mark.slow
def test_first_step_for_a_new_model_two_fault_free_runs_are_bit_identical(harness):
    """What `moetion faults` without a kill runs: a second fault-free run against the first."""
    report = harness.run([])
    assert report.verdict.identical and report.verdict.iterations == 8, "\n".join(report.lines())


@pytest.mark.slow
def test_kills_at_forward_backward_and_step_recover_bit_identically(harness):
    """One run, three recoveries: every stage replays blocks with torch's dropout and jitter under
    every checkpoint mode, from a window (stages 1, 2) or from the initial state (stage 0)."""
    report = harness.run(["stage=0,iter=1,phase=forward", "stage=1,iter=4,phase=backward", "stage=2,iter=6,phase=step"])
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert len(restored) == 3 and all(t.replayed_stage_iterations > 0 for t in restored)


@pytest.mark.slow
def test_negative_control_a_replacement_leaving_torch_generators_alone_mismatches(harness, monkeypatch):
    monkeypatch.setenv(BREAK_ENV, "1")  # read by the script: only the replacement turns the reseeding off
    report = harness.run(["stage=1,iter=4,phase=backward"])
    assert not report.verdict.identical and not report.verdict.weights_equal, "\n".join(report.lines())
