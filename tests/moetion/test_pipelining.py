"""moetion attached to torch.distributed.pipelining stages: training is unchanged bit for bit, and a
stage replayed from its window and its neighbours' logs lands on the live stage's bits."""
import dataclasses
import os
import signal

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import moetion
from moetion import pipelining
from moetion.errors import NondeterministicOpError
from moetion.env import KILLS as KILL_ENV
from moetion.launcher import run_workers, supervise_workers
from logging_store import LogStore
from moetion.replay import adapt_replay_ports, clear_replay_port_adapters, replay_stage
from moetion.run_identity import fresh_job_nonce
from moetion.snapshot.image import WindowImage, WindowManifest
from moetion.snapshot.shm import SharedMemoryTier
from moetion.upstream_log import LogReader
import pipelining_models as pm

pytestmark = pytest.mark.slow  # real ranks over gloo

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
ITERATIONS = 4


def plain_rank(kind, dtype=torch.float32):
    """The user's script without moetion: schedule.step, then optimizer.step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module = pm.stage_module(rank, world, dtype=dtype)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), input_args=pm.example(rank, dtype),
                          output_args=pm.example(rank + 1, dtype))
    schedule = SCHEDULES[kind](stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn)
    opt, source, losses = pm.optimizer(module), pm.data(ITERATIONS, dtype), []
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


def attached_rank(kind, config, dropout=0.0, shm_dir=None, dtype=torch.float32):
    """The same script with moetion attached; with ``shm_dir``, also its logs and latest window."""
    job = pipelining.join(config)
    module = pm.stage_module(job.stage, job.num_stages, dropout=dropout, dtype=dtype)
    stage = pipelining.LoggedStage(module, job.stage, job.num_stages, job.device,
                                   input_args=pm.example(job.stage, dtype), output_args=pm.example(job.stage + 1, dtype))
    schedule = SCHEDULES[kind](stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn)
    opt = pm.optimizer(module)
    engine = pipelining.attach(job, stage, schedule, optimizer=opt, loss_fn=pm.loss_fn)
    source, logs = pm.data(ITERATIONS, dtype), []
    for t in range(ITERATIONS):
        engine.train_batch(source)
        if engine.upstream is not None:
            logs.append(engine.upstream.export(t, t + 1))  # before retention drops it
    result = {"model": module.state_dict(), "optim": opt.state_dict()["state"], "stage": job.stage,
              "losses": [engine.losses[t] for t in range(ITERATIONS)], "logs": b"".join(logs),
              "clipped": engine.last_stats.clip_coef < 1.0}
    if engine.checkpointer is not None:
        engine.checkpointer.worker.fence()
        image = SharedMemoryTier(shm_dir, run_id="pp", job_nonce=fresh_job_nonce(), stage=job.stage,
                                 replica=0).load_complete()
        result.update(manifest=image.manifest.to_json(), blob=image.blob[: image.manifest.blob_bytes].clone())
    engine.close()
    return result


def assert_same(a, b):
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optim"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optim"][index][key]), (index, key)


@pytest.mark.parametrize("kind, stages, dtype", [
    ("gpipe", 2, torch.float32), ("1f1b", 2, torch.float32), ("gpipe", 4, torch.bfloat16), ("1f1b", 4, torch.bfloat16)])
def test_attached_training_equals_plain_pipelining_bit_for_bit(kind, stages, dtype):
    plain = run_workers(plain_rank, nproc=stages, args=(kind, dtype), timeout_s=120)
    attached = run_workers(attached_rank, nproc=stages, args=(kind, moetion_config(), 0.0, None, dtype), timeout_s=120)
    for p, a in zip(plain, attached):
        assert_same(p, a)
    assert attached[-1]["losses"] == plain[-1]["losses"]
    assert len(set(attached[-1]["losses"])) == ITERATIONS  # the model trains: every loss differs


def replay_config(shm_dir):
    return moetion_config(grad_clip=0.3, snapshot={"enabled": True, "window": 2, "shm_dir": str(shm_dir), "run_id": "pp"},
                          upstream_log={"enabled": True},
                          lr_schedule={"warmup_iterations": 2, "decay": "cosine", "decay_iterations": 4})


def replay(ranks, kind, stage, reader_type):
    """Rebuilds ``stage`` from its window and its neighbours' logs alone, in a fresh process."""
    logs = {}
    for other in ranks:
        if abs(other["stage"] - stage) == 1:
            logs[other["stage"]] = LogStore()
            logs[other["stage"]].import_(other["logs"])
    mine = ranks[stage]
    image = WindowImage(WindowManifest.from_json(mine["manifest"]), mine["blob"])
    module = pm.stage_module(stage, len(ranks), dropout=0.2)
    opt = pm.optimizer(module)
    schedule_type = SCHEDULES[kind]
    order = pipelining.SUPPORTED_SCHEDULES[schedule_type]
    report = replay_stage(
        module=pipelining.StageModule(module, stage_id=stage, num_stages=len(ranks), loss_fn=pm.loss_fn),
        optimizer=opt, config=moetion.Config.from_dict(replay_config("/unused")), window=image,
        logs=reader_type(logs, stage=stage), data=pm.data(ITERATIONS), until=ITERATIONS - 1,
        stage_schedule=moetion.schedule.StageSchedule(order, moetion.schedule.LossScaling.GRADS))
    return {"model": module.state_dict(),
            "optim": opt.state_dict()["state"], "replayed": report.iterations_replayed}


class PerturbedGradient(LogReader):
    """One logged output gradient is nudged."""

    def gradient(self, iteration, micro_batch, like=None):
        g = super().gradient(iteration, micro_batch, like)
        if micro_batch == 1:
            g.view(-1)[0] += 1e-4
        return g


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_a_replayed_stage_lands_on_the_live_bits(tmp_path, kind):
    """Three stages with dropout, clipping and an LR schedule; the middle one rebuilt from its window and
    both neighbours' logs equals the live stage; a perturbed logged gradient does not."""
    ranks = run_workers(attached_rank, nproc=3, args=(kind, replay_config(tmp_path), 0.2, tmp_path), timeout_s=120)
    assert all(r["clipped"] for r in ranks), "clipping must be active for the test to mean something"
    exact, perturbed = (run_workers(replay, nproc=1, args=(ranks, kind, 1, reader), timeout_s=120)[0]
                        for reader in (LogReader, PerturbedGradient))
    assert exact["replayed"] >= 1
    assert_same(ranks[1], exact)
    with pytest.raises(AssertionError):
        assert_same(ranks[1], perturbed)


def misuse_rank():
    """One rank's worth of misuse, each answered by a ConfigError; returns the messages."""
    from torch import nn
    from torch.distributed.pipelining import ScheduleInterleaved1F1B

    job = pipelining.join(moetion_config(micro_batches=2))
    messages = []

    def attempt(stage, schedule):  # refused before the optimizer is looked at
        try:
            pipelining.attach(job, stage, schedule, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
                              loss_fn=pm.loss_fn)
        except moetion.ConfigError as error:
            messages.append(str(error))

    module = pm.stage_module(0, 2)
    stages = [pipelining.LoggedStage(pm.stage_module(s, 2), s, 2, job.device, input_args=pm.example(s),
                                     output_args=pm.example(s + 1)) for s in range(2)]
    attempt(stages[0], ScheduleInterleaved1F1B(stages, n_microbatches=2, loss_fn=pm.loss_fn))
    empty = nn.Identity()
    stage = pipelining.LoggedStage(empty, 0, 1, job.device, input_args=pm.example(0), output_args=pm.example(1))
    attempt(stage, ScheduleGPipe(stage, n_microbatches=2, loss_fn=pm.loss_fn))
    stage = PipelineStage(module, 0, 1, job.device, input_args=pm.example(0), output_args=pm.example(1))
    attempt(stage, ScheduleGPipe(stage, n_microbatches=2, loss_fn=pm.loss_fn))

    stage = pipelining.LoggedStage(module, 0, 1, job.device, input_args=pm.example(0), output_args=pm.example(1))
    opt = pm.optimizer(module)
    engine = pipelining.attach(job, stage, ScheduleGPipe(stage, n_microbatches=2, loss_fn=pm.loss_fn), optimizer=opt,
                               loss_fn=pm.loss_fn)
    source = moetion.TensorDataSource(torch.randn(8, pm.WIDTH), torch.randn(8, pm.WIDTH), micro_batch_size=2,
                                      micro_batches_per_iteration=2)
    engine.train_batch(source)
    opt.step()  # the user's own step on top of moetion's commit
    try:
        engine.train_batch(source)
    except moetion.ConfigError as error:
        messages.append(str(error))
    engine.close()

    stage = pipelining.LoggedStage(module, 0, 1, job.device, input_args=pm.example(0), output_args=pm.example(1))
    engine = pipelining.attach(job, stage, ScheduleGPipe(stage, n_microbatches=4, loss_fn=pm.loss_fn),
                               optimizer=pm.optimizer(module), loss_fn=pm.loss_fn)
    try:
        engine.train_batch(source)  # the config says 2 micro-batches
    except moetion.ConfigError as error:
        messages.append(str(error))

    class Scatter(nn.Linear):  # put_ has no deterministic implementation on CPU
        def forward(self, x):
            return super().forward(x).put_(torch.tensor([0]), torch.tensor([1.0]))

    module = Scatter(pm.WIDTH, pm.WIDTH)
    stage = pipelining.LoggedStage(module, 0, 1, job.device, input_args=pm.example(0), output_args=pm.example(1))
    engine = pipelining.attach(job, stage, ScheduleGPipe(stage, n_microbatches=2, loss_fn=pm.loss_fn),
                               optimizer=pm.optimizer(module), loss_fn=pm.loss_fn)
    torch.use_deterministic_algorithms(True)  # what config determinism.strict turns on at join
    try:
        engine.train_batch(source)
    except NondeterministicOpError as error:
        messages.append(str(error))
    return messages


def test_misuse_is_refused_with_what_to_change():
    (messages,) = run_workers(misuse_rank, nproc=1, timeout_s=120)
    assert len(messages) == 6, messages
    interleaved, empty, plain, stepped, micro_batches, nondeterministic = messages
    assert "ScheduleInterleaved1F1B is not supported" in interleaved and "Schedule1F1B" in interleaved
    assert "no parameters" in empty
    assert "LoggedStage" in plain and "PipelineStage" in plain
    assert "remove optimizer.step" in stepped
    assert "more micro-batches than micro_batches=2" in micro_batches and "n_microbatches" in micro_batches
    assert nondeterministic.startswith("put_ has no deterministic implementation on cpu (stage 0, iteration 0, "
                                       "micro-batch 0, forward)")


def recovering_rank(kind, shm_dir, dtype=torch.float32):
    """Trains until the engine reaches ITERATIONS (a replacement starts mid-run); returns its final state."""
    config = replay_config(shm_dir)
    config["peer_timeout_s"] = 60
    job = pipelining.join(config)
    module = pm.stage_module(job.stage, job.num_stages, dropout=0.2, dtype=dtype)
    stage = pipelining.LoggedStage(module, job.stage, job.num_stages, job.device,
                                   input_args=pm.example(job.stage, dtype), output_args=pm.example(job.stage + 1, dtype))
    schedule = SCHEDULES[kind](stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn)
    opt = pm.optimizer(module)
    engine = pipelining.attach(job, stage, schedule, optimizer=opt, loss_fn=pm.loss_fn)
    source = pm.data(ITERATIONS, dtype)
    while engine.iteration < ITERATIONS:
        engine.train_batch(source)
    engine.close()
    return {"model": module.state_dict(), "optim": opt.state_dict()["state"], "stage": job.stage,
            "losses": [engine.losses[t] for t in range(ITERATIONS)]}


class NudgedGradient:
    """The replacement's input port with one logged output gradient nudged (negative control)."""

    def __init__(self, inputs):
        self.inputs = inputs

    def activation(self, iteration, micro_batch):
        return self.inputs.activation(iteration, micro_batch)

    def gradient(self, iteration, micro_batch, like):
        g = self.inputs.gradient(iteration, micro_batch, like)
        if micro_batch == 1:
            g = g.clone()
            g.view(-1)[0] += 1e-4
        return g


def nudge_a_logged_gradient(ports):
    return dataclasses.replace(ports, inputs=NudgedGradient(ports.inputs))


@pytest.mark.parametrize("kind, kill, dtype", [
    ("1f1b", "stage=1,iter=2,phase=backward", torch.float32),  # before the first window completes: from the initial state
    ("1f1b", "stage=2,iter=3,phase=forward", torch.bfloat16),  # the last stage, from window 1..2, a bf16 module
    ("gpipe", "stage=1,iter=3,phase=step", torch.float32),     # the middle stage, from window 1..2; the negative control
    # The rest of the middle/last x forward/backward/step matrix, one recovery each, in one run:
    ("1f1b", "stage=1,iter=1,phase=forward;stage=2,iter=2,phase=backward;stage=2,iter=3,phase=step", torch.float32),
])
def test_a_killed_stage_recovers_bit_identically_and_a_nudged_log_does_not(tmp_path, kind, kill, dtype):
    """SIGKILL of a stage under the recovering supervisor: its replacement restores its window and
    replays from its neighbours' logs; the run ends equal to the fault-free one. With one logged gradient
    nudged in the replacement's replay, it does not."""
    reference = run_workers(recovering_rank, nproc=3, args=(kind, tmp_path / "a", dtype), timeout_s=150)
    report = supervise_workers(recovering_rank, nproc=3, args=(kind, tmp_path / "b", dtype), recover=True,
                               timeout_s=150, env={KILL_ENV: kill})
    assert len(report.recoveries) == len(kill.split(";"))
    for expected, recovered in zip(reference, report.results):
        assert_same(expected, recovered)
        assert recovered["losses"] == expected["losses"]
    if kind == "gpipe":
        adapt_replay_ports(nudge_a_logged_gradient)  # inherited by the replacement this process forks
        try:
            report = supervise_workers(recovering_rank, nproc=3, args=(kind, tmp_path / "c"), recover=True,
                                       timeout_s=150, env={KILL_ENV: kill})
        finally:
            clear_replay_port_adapters()
        with pytest.raises(AssertionError):
            assert_same(reference[1], report.results[1])


def restart_rank(root, resume=False, kill_at=None):
    """Six iterations persisting windows to disk; killed at ``kill_at``, or resumed from disk."""
    config = replay_config(root / "shm")
    config["snapshot"] |= {"persist_dir": str(root / "disk"), "run_id": "pp-restart"}
    job = pipelining.join(config)
    module = pm.stage_module(job.stage, job.num_stages, dropout=0.2)
    stage = pipelining.LoggedStage(module, job.stage, job.num_stages, job.device, input_args=pm.example(job.stage),
                                   output_args=pm.example(job.stage + 1))
    opt = pm.optimizer(module)
    engine = pipelining.attach(job, stage, Schedule1F1B(stage, n_microbatches=pm.MICRO_BATCHES, loss_fn=pm.loss_fn),
                               optimizer=opt, loss_fn=pm.loss_fn)
    source = pm.data(6)
    start = engine.load_checkpoint(source) if resume else 0
    for t in range(start, 6):
        if t == kill_at:
            engine.checkpointer.drain(timeout_s=60)  # persisting is asynchronous: let the windows reach the disk
            os.kill(os.getpid(), signal.SIGKILL)
        engine.train_batch(source)
    engine.close()
    return {"model": module.state_dict(), "optim": opt.state_dict()["state"], "start": start,
            "losses": [engine.losses[t] for t in range(start, 6)]}


def test_a_whole_job_restart_from_disk_continues_bit_identically(tmp_path):
    straight = run_workers(restart_rank, nproc=2, args=(tmp_path / "a",), timeout_s=120)
    with pytest.raises(moetion.LaunchError, match="killed by SIGKILL"):
        run_workers(restart_rank, nproc=2, args=(tmp_path / "b", False, 5), timeout_s=120, grace_s=2)
    resumed = run_workers(restart_rank, nproc=2, args=(tmp_path / "b", True), timeout_s=120,
                          env={"MOETION_RESUME": "1"})  # as `moetion launch --resume` sets it
    assert resumed[0]["start"] == 5, "resumed after the newest persisted window (3..4), not from scratch"
    for expected, restarted in zip(straight, resumed):
        assert_same(expected, restarted)
        assert restarted["losses"] == expected["losses"][restarted["start"]:]
