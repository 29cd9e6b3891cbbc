"""User data forms and torch LR schedulers on real ranks: pipeline equals the single-process
reference, recovery and whole-job restart are bit-identical, and the harness catches a replacement
that continues from the wrong data position. Forms: a map-style dataset, a token file and a
torchdata ``StatefulDataLoader`` passed as ``data_iter``."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import moetion
from moetion.data_iter import IteratorSource
from moetion.export import JobSpec, export_run
from moetion.harness.runner import FaultHarness, Job
from moetion.launcher import run_workers
from moetion.lr_scheduler import scheduler_state
from moetion.models import build_gpt_moe_layers, gpt_moe_loss
from moetion.reference import train_reference

import data_schedule_job as job

pytestmark = pytest.mark.slow  # real ranks over gloo

STAGES, ITERATIONS = 3, 10  # the dataset's 6 iterations an epoch: two epochs
FORMS = [("dataset", "warmup_cosine"), ("tokens", "one_cycle")]


def pipeline_rank(form, scheduler, token_path):
    module, engine = job.build(STAGES, scheduler)
    source = job.data(form, token_path)
    losses = [engine.train_batch(source) for _ in range(ITERATIONS)]
    return {"stage": engine.stage, "losses": losses, "model": module.state_dict(),
            "optim": engine.optimizer.state_dict(), "scheduler": scheduler_state(engine.lr_scheduler)}


def reference(form, scheduler, token_path, iterations=ITERATIONS):
    data = job.data(form, token_path, items=4 * iterations if form == "loader" else 24)
    if form == "loader":
        data = IteratorSource(data, where="the reference")
    run = train_reference(layers=build_gpt_moe_layers(job.MODEL), num_stages=STAGES, loss_fn=gpt_moe_loss,
                          optimizer=job.optimizer, config=moetion.Config.from_dict(job.config()),
                          data=data, iterations=iterations, module_seed=2,
                          lr_scheduler=job.SCHEDULERS[scheduler])
    return {"losses": run.losses, "models": [s.state_dict() for s in run.stages],
            "optims": [o.state_dict() for o in run.optimizers],
            "schedulers": [scheduler_state(s) for s in run.schedulers]}


@pytest.mark.parametrize("form,scheduler", FORMS)
def test_pipeline_equals_reference(tmp_path, form, scheduler):
    token_path = str(job.write_token_file(tmp_path / "tokens.bin"))
    ranks = run_workers(pipeline_rank, nproc=STAGES, args=(form, scheduler, token_path), timeout_s=120)
    expected = run_workers(reference, nproc=1, args=(form, scheduler, token_path), timeout_s=120)[0]
    assert all(s["scheduler"]["last_epoch"] == ITERATIONS for s in expected["schedulers"]), "one step an iteration"
    assert all(g["lr"] != 1e-2 for s in expected["schedulers"] for g in s["param_groups"]), "the LR never moved"
    for rank in ranks:
        s = rank["stage"]
        assert rank["losses"] == expected["losses"], f"stage {s}"
        for name, value in expected["models"][s].items():
            assert torch.equal(rank["model"][name], value), f"stage {s}: {name}"
        for index, state in expected["optims"][s]["state"].items():
            assert all(torch.equal(rank["optim"]["state"][index][k], v) for k, v in state.items()), f"stage {s}"
        assert rank["optim"]["param_groups"] == expected["optims"][s]["param_groups"]
        assert rank["scheduler"] == expected["schedulers"][s]


LOADER_ITERATIONS = 10  # the loader's one epoch of 40 items


def loader_rank():
    """Trains until the StatefulDataLoader runs out, as a DeepSpeed loop would."""
    module, engine = job.build(STAGES, "warmup_cosine", snapshot={"enabled": True, "window": 2},
                               upstream_log={"enabled": True})
    loader, losses = job.data("loader", items=4 * LOADER_ITERATIONS), []
    while True:
        try:
            losses.append(engine.train_batch(data_iter=loader))
        except moetion.DataExhausted as error:
            ended = str(error)
            break
    engine.close()
    return {"stage": engine.stage, "iteration": engine.iteration, "ended": ended, "losses": losses,
            "model": module.state_dict(), "scheduler": scheduler_state(engine.lr_scheduler)}


def test_data_iter_equals_reference_and_ends_at_an_iteration_boundary_when_it_runs_out():
    ranks = run_workers(loader_rank, nproc=STAGES, timeout_s=120)
    expected = run_workers(reference, nproc=1, timeout_s=120,
                           args=("loader", "warmup_cosine", None, LOADER_ITERATIONS))[0]
    for rank in ranks:
        s = rank["stage"]
        assert rank["iteration"] == LOADER_ITERATIONS, "every rank stops at the same boundary"
        assert f"ran out after iteration {LOADER_ITERATIONS - 1}" in rank["ended"]
        assert rank["losses"] == expected["losses"], f"stage {s}: every iteration with data committed"
        for name, value in expected["models"][s].items():
            assert torch.equal(rank["model"][name], value), f"stage {s}: {name}"
        assert rank["scheduler"] == expected["schedulers"][s]


@pytest.fixture(scope="module")
def token_path(tmp_path_factory):
    return str(job.write_token_file(tmp_path_factory.mktemp("tokens") / "tokens.bin"))


def harness(tmp_path, form, scheduler, token_path, flags):
    script = str(Path(job.__file__))
    return FaultHarness(Job(script=script, nproc=STAGES,
                            script_args=[str(tmp_path / "shm"), form, scheduler, str(ITERATIONS), token_path, str(flags)]),
                        work_dir=tmp_path / "work", timeout_s=400)


# First and last stage, at forward and at step, two kills in each faulty run.
KILLS = {"dataset": ["stage=0,iter=3,phase=forward", "stage=2,iter=7,phase=step"],
         "tokens": ["stage=0,iter=4,phase=step", "stage=2,iter=6,phase=forward"],
         # and the middle stage lost after the last commit, restored while the others wait in close()
         "loader": ["stage=0,iter=5,phase=step", "stage=2,iter=7,phase=forward", "stage=1,iter=9,phase=step"]}


@pytest.mark.parametrize("form,scheduler", FORMS + [("loader", "warmup_cosine")])
def test_first_and_last_stage_killed_recover_bit_identically(tmp_path, token_path, form, scheduler):
    flags = tmp_path / "flags"
    flags.mkdir()
    faults = harness(tmp_path, form, scheduler, token_path, flags)
    report = faults.run(KILLS[form])
    assert report.verdict.identical, "\n".join(report.lines())
    assert len(report.timelines) == len(KILLS[form])
    if form == "loader":  # one negative control for the data position (each costs a job run)
        # Negative control: the replacement continues from the wrong data position.
        (flags / "wrong-position").touch()
        wrong = faults.run(KILLS[form][:1])
        assert not wrong.verdict.identical
        assert any("loss of iteration" in m or "differs" in m for m in wrong.verdict.mismatches)


RESTART_ITERATIONS = 12  # one epoch of 48 items


def restart_job(root, form, *, resume=False, kill_at=None):
    module, engine = job.build(STAGES, "plateau",
                               snapshot={"enabled": True, "window": 3, "shm_dir": str(root / "shm"), "run_id": "restart",
                                         "persist_dir": str(root / "disk")},
                               upstream_log={"enabled": True})
    if form == "loader":  # a user's resumable loader over a StatefulDataLoader: one epoch of 12 iterations
        source = job.RecordingLoader(job.data("loader", items=48))
        start = engine.load_checkpoint(data_iter=source) if resume else 0
    else:
        source = RecordingSource(job.data("dataset", items=48))
        start = engine.load_checkpoint(source) if resume else 0
    ids = root / f"ids-{'resumed' if resume else 'first'}-rank{engine.dist.rank}.jsonl"
    models = {}  # by iteration, for the export check
    for t in range(start, RESTART_ITERATIONS):
        if t == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        job.train_batch(engine, source)
        models[t] = {name: value.clone() for name, value in module.state_dict().items()}
        if engine.stage == 0:  # the stage that reads inputs: the ids it trained on, once committed
            with open(ids, "a") as f:
                f.write(json.dumps({"iteration": t, "ids": source.read[t]}) + "\n")
    engine.close()
    return {"start": start, "model": module.state_dict(), "optim": engine.optimizer.state_dict(),
            "scheduler": scheduler_state(engine.lr_scheduler), "losses": dict(engine.losses), "models": models}


class RecordingSource:
    """The first token of each row read, by iteration (a replay's re-reads overwrite the same key)."""

    def __init__(self, base):
        self.base, self.read = base, {}

    def micro_batch(self, iteration, index):
        inputs, labels = self.base.micro_batch(iteration, index)
        self.read.setdefault(iteration, {})[index] = inputs[:, 0].tolist()
        return inputs, labels


def _straight(root, form):
    return restart_job(root, form)


def _killed(root, form):
    return restart_job(root, form, kill_at=10)


def _resumed(root, form):
    return restart_job(root, form, resume=True)


@pytest.mark.parametrize("form", ["dataset", "loader"])
def test_whole_job_restart_sees_every_sample_exactly_once(tmp_path, form):
    straight = run_workers(_straight, nproc=STAGES, args=(tmp_path / "a", form), timeout_s=180)
    with pytest.raises(moetion.LaunchError, match="killed by SIGKILL"):
        run_workers(_killed, nproc=STAGES, args=(tmp_path / "b", form), timeout_s=180, grace_s=2)
    resumed = run_workers(_resumed, nproc=STAGES, args=(tmp_path / "b", form), timeout_s=180,
                          env={"MOETION_RESUME": "1"})  # as `moetion launch --resume` sets it
    start = resumed[0]["start"]
    assert 0 < start < 10, "resumed from a persisted window, not from scratch"
    first = [json.loads(line) for line in (tmp_path / "b" / "ids-first-rank0.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b" / "ids-resumed-rank0.jsonl").read_text().splitlines()]
    trained = [r for r in first if r["iteration"] < start] + again
    assert [r["iteration"] for r in trained] == list(range(RESTART_ITERATIONS))
    ids = sorted(i for r in trained for m in sorted(r["ids"]) for i in r["ids"][m])
    assert ids == list(range(48)), "every sample of the epoch exactly once"
    assert straight[0]["optim"]["param_groups"][0]["lr"] < 1e-2, "the plateau schedule never cut the LR"
    for before, after in zip(straight, resumed):
        assert after["losses"] == {t: before["losses"][t] for t in after["losses"]}
        assert after["scheduler"] == before["scheduler"]
        assert after["optim"]["param_groups"] == before["optim"]["param_groups"]
        for name, value in before["model"].items():
            assert torch.equal(after["model"][name], value), name
        for index, state in before["optim"]["state"].items():
            assert all(torch.equal(after["optim"]["state"][index][k], v) for k, v in state.items())
    # `moetion export` of the straight run: it needs the scheduler factory and, for a loader, a fresh one.
    data = job.RecordingLoader(job.data("loader", items=48)) if form == "loader" else job.data("dataset", items=48)
    spec = JobSpec(layers=build_gpt_moe_layers(job.MODEL), num_stages=STAGES, loss_fn=gpt_moe_loss,
                   optimizer=job.optimizer, data=data, module_seed=2, lr_scheduler=job.plateau)
    summary = export_run(tmp_path / "a" / "disk" / "restart", tmp_path / "dense.pt", job=spec, progress=lambda _: None)
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)["model"]
    expected = {name: value for rank in straight for name, value in rank["models"][summary["iteration"]].items()}
    assert sorted(dense) == sorted(expected)
    assert all(torch.equal(dense[name], value) for name, value in expected.items())
