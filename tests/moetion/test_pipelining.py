"""moetion attached to torch.distributed.pipelining stages: training is unchanged bit for bit, and a
stage replayed from its window and its neighbours' logs lands on the live stage's bits."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import moetion
from moetion import pipelining
from moetion.launcher import run_workers
from moetion.replay import replay_stage
from moetion.snapshot.image import WindowImage, WindowManifest
from logging_store import LogStore
from moetion.upstream_log import LogReader
import pipelining_models as pm

pytestmark = pytest.mark.slow  # real ranks over gloo

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
ITERATIONS = 4


def plain_rank(kind):
    """The user's script without moetion: schedule.step, then optimizer.step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = pm.stage_module(rank, world)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), input_args=pm.example(rank),
                          output_args=pm.example(rank + 1))
    schedule = SCHEDULES[kind](stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn)
    opt, source, losses = pm.optimizer(module), pm.data(ITERATIONS), []
    for t in range(ITERATIONS):
        mbs = [source.micro_batch(t, m) for m in range(pm.MICRO_BATCHES)]
        args = (torch.cat([x for x, _ in mbs]),) if rank == 0 else ()
        target = torch.cat([y for _, y in mbs]) if rank == world - 1 else None
        step_losses = [] if rank == world - 1 else None
        opt.zero_grad(set_to_none=True)
        schedule.step(*args, target=target, losses=step_losses, return_outputs=False)
        opt.step()
        if step_losses is not None:
            total = torch.zeros((), dtype=torch.float32)
            for loss in step_losses:
                total += loss.detach().float()
            losses.append(float(total) / pm.MICRO_BATCHES)
    dist.destroy_process_group()
    return {"model": module.state_dict(), "optim": opt.state_dict()["state"], "losses": losses}


def moetion_config(**extra):
    return {"seed": 3, "micro_batches": pm.MICRO_BATCHES, "grad_clip": None, "threads": 1, **extra}


def attached_rank(kind, config, keep_logs=False):
    """The same script with moetion attached."""
    job = pipelining.join(config)
    module = pm.stage_module(job.stage, job.num_stages, dropout=config.get("dropout", 0.0) if isinstance(config, dict) else 0.0)
    stage = pipelining.LoggedStage(module, job.stage, job.num_stages, job.device, input_args=pm.example(job.stage),
                                   output_args=pm.example(job.stage + 1))
    schedule = SCHEDULES[kind](stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn)
    opt = pm.optimizer(module)
    engine = pipelining.attach(job, stage, schedule, optimizer=opt, loss_fn=pm.loss_fn)
    source, logs = pm.data(ITERATIONS), []
    for t in range(ITERATIONS):
        engine.train_batch(source)
        if keep_logs:
            logs.append(engine.upstream.export(t, t + 1))
    result = {"model": module.state_dict(), "optim": opt.state_dict()["state"],
              "losses": [engine.losses[t] for t in range(ITERATIONS)], "logs": b"".join(logs), "stage": job.stage}
    engine.close()
    return result


def assert_same(a, b):
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optim"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optim"][index][key]), (index, key)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_attached_training_equals_plain_pipelining_bit_for_bit(kind):
    plain = run_workers(plain_rank, nproc=2, args=(kind,), timeout_s=120)
    attached = run_workers(attached_rank, nproc=2, args=(kind, moetion_config()), timeout_s=120)
    for p, a in zip(plain, attached):
        assert_same(p, a)
    assert attached[-1]["losses"] == plain[-1]["losses"]
    assert len(set(attached[-1]["losses"])) == ITERATIONS  # the model trains: every loss differs
