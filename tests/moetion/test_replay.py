"""Replay rebuilds any stage bit for bit: run a real pipeline past a complete window, then in
another process rebuild each stage's S_f from its window and its neighbours' logs only, and
compare weights and the full optimizer state with torch.equal."""
import dataclasses
import shutil

import pytest
import torch

import moetion
from logging_store import LogStore
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.replay import dense_state_from_persisted, replay_stage
from moetion.run_identity import fresh_job_nonce
from moetion.snapshot.image import WindowImage, WindowManifest
from moetion.snapshot.shm import SharedMemoryTier
from moetion.upstream_log import IterationScalars, LogReader
from window_image_helpers import make_image

pytestmark = pytest.mark.slow  # real ranks over gloo

STAGES = 4
MODEL = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_hidden=32, num_experts=4,
                     capacity_factor=1.0, router_noise=0.1, dropout=0.1)


def config(precision, window, shm_dir):
    return moetion.Config.from_dict({
        "seed": 9, "micro_batches": 4, "precision": precision, "grad_clip": 0.5, "threads": 1,
        "lr_schedule": {"warmup_iterations": 2, "decay": "cosine", "decay_iterations": 10, "min_ratio": 0.1},
        "snapshot": {"enabled": True, "window": window, "shm_dir": str(shm_dir), "run_id": "replay"},
        "upstream_log": {"enabled": True},
    })


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def data():
    return moetion.ByteCorpus(moetion.data.stdlib_corpus(max_bytes=1 << 16), seq_len=8, micro_batch_size=2, seed=4)


def train(precision, window, iterations, shm_dir, grab_after=None, stages=STAGES):
    """Trains; returns live state at the end, all logs, and the latest complete window either at
    the end or right after iteration ``grab_after`` (an older window, for a longer replay)."""
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), stages, loss_fn=gpt_moe_loss, seed=2)
    engine = moetion.initialize(module, optimizer=optimizer, config=config(precision, window, shm_dir))
    source, clipped, image, logs = data(), 0, None, []
    tier = SharedMemoryTier(shm_dir, run_id="replay", job_nonce=fresh_job_nonce(), stage=engine.stage,
                            replica=engine.dist.replica)
    for t in range(iterations):
        engine.train_batch(source)
        clipped += engine.last_stats.clip_coef < 1.0
        logs.append(engine.upstream.export(t, t + 1))  # before retention drops it
        if t == grab_after:
            engine.checkpointer.worker.fence()
            image = tier.load_complete()
            image.blob = image.blob.clone()
    engine.checkpointer.worker.fence()
    kept = {key.iteration for key in engine.upstream.store.keys()}
    # Job-wide retention: from the oldest window any stage could restore from, as of the last commit
    # (this stage's newest window may have been published after it).
    restorable = engine.checkpointer.job_restorable_start
    assert min(kept) == engine.upstream.kept_from == restorable <= engine.checkpointer.last_complete.start_iteration
    logs = b"".join(logs)
    engine.close()
    image = image or tier.load_complete()
    return {"stage": engine.stage, "replica": engine.dist.replica, "logs": logs, "manifest": image.manifest.to_json(),
            "blob": image.blob[: image.manifest.blob_bytes].clone(), "clipped": clipped,
            "model": module.state_dict(), "optim": engine.optimizer.state_dict()["state"]}


def rebuild(ranks, precision, until, reader_type=LogReader):
    """Replays every stage from its own window and only the logs of the stages it talks to."""
    rebuilt = {}
    for r in ranks:
        stage = r["stage"]
        talks_to = {stage - 1, stage + 1} | ({STAGES - 1} if stage == 0 else {0} if stage == STAGES - 1 else set())
        logs = {}
        for other in ranks:
            if other["stage"] in talks_to:
                logs[other["stage"]] = LogStore()
                logs[other["stage"]].import_(other["logs"])
        image = WindowImage(WindowManifest.from_json(r["manifest"]), r["blob"])
        module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), STAGES, loss_fn=gpt_moe_loss, seed=2, stage_id=stage)
        opt = optimizer(module.parameters())
        report = replay_stage(module=module, optimizer=opt, config=config(precision, None, "/unused"), window=image,
                              logs=reader_type(logs, stage=stage), data=data(), until=until)
        rebuilt[stage] = {"model": module.state_dict(), "optim": opt.state_dict()["state"],
                          "replayed": report.iterations_replayed, "window": image.manifest.window}
    return rebuilt


def differences(ranks, rebuilt):
    bad = []
    for r in ranks:
        mine = rebuilt[r["stage"]]
        for name, value in r["model"].items():
            if not torch.equal(mine["model"][name], value):
                bad.append(f"stage {r['stage']} {name}")
        for index, state in r["optim"].items():
            for key, value in state.items():
                if not torch.equal(mine["optim"][index][key], value):
                    bad.append(f"stage {r['stage']} optimizer[{index}].{key}")
    return bad


def train_and_rebuild(tmp_path, precision, window, iterations, reader_type=LogReader, grab_after=None):
    ranks = run_workers(train, nproc=STAGES, args=(precision, window, iterations, tmp_path, grab_after), timeout_s=180)
    rebuilt = run_workers(rebuild, nproc=1, args=(ranks, precision, iterations - 1, reader_type), timeout_s=180)[0]
    return ranks, rebuilt


@pytest.mark.parametrize("precision, window, iterations, grab_after", [
    ("fp32", 3, 8, None),    # windows 1..3, 4..6 complete; replay 5..7 (two with frozen operators)
    ("bf16", 3, 8, None),
    ("fp32", 1, 5, 1),       # W=1, every window dense: replay 2..4 from window 1..1
    ("fp32", 12, 15, None),  # W = operators of the widest stage, one per slot: replay 2..14
])
def test_every_stage_is_rebuilt_bit_for_bit(tmp_path, precision, window, iterations, grab_after):
    ranks, rebuilt = train_and_rebuild(tmp_path, precision, window, iterations, grab_after=grab_after)
    assert all(r["clipped"] > 0 for r in ranks), "clipping must be active for the test to mean something"
    assert all(b["replayed"] >= 1 and b["window"] == window for b in rebuilt.values())
    assert differences(ranks, rebuilt) == []


class PerturbedActivation(LogReader):
    """One logged activation entry is off by one ulp-ish nudge."""

    def activation(self, iteration, micro_batch):
        x = super().activation(iteration, micro_batch)
        if micro_batch == 1:
            x.view(-1)[0] += 1e-3
        return x


class FailureTimeLR(LogReader):
    """The reference implementation's bug: every replayed step uses the LR of the failure iteration."""

    def scalars(self, iteration):
        real, last = super().scalars(iteration), super().scalars(7)
        return IterationScalars(last.lr_factor, real.grad_norm, real.clip_coef)


@pytest.mark.parametrize("reader_type", [PerturbedActivation, FailureTimeLR])
def test_negative_controls_make_the_comparison_fail(tmp_path, reader_type):
    ranks, rebuilt = train_and_rebuild(tmp_path, "fp32", 3, 8, reader_type)
    bad = differences(ranks, rebuilt)
    assert bad, "a corrupted replay must not compare equal"
    if reader_type is PerturbedActivation:  # stage 0 reads no activations: it must still be exact
        assert not any(b.startswith("stage 0 ") for b in bad)


def train_persisted(root, iterations):
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), STAGES, loss_fn=gpt_moe_loss, seed=2)
    cfg = config("fp32", 3, root / "shm")
    cfg.snapshot.persist_dir = str(root / "disk")
    engine = moetion.initialize(module, optimizer=optimizer, config=cfg)
    source, states = data(), {}
    for t in range(iterations):
        engine.train_batch(source)
        states[t] = {"model": {k: v.clone() for k, v in module.state_dict().items()},
                     "optim": {i: {k: v.clone() for k, v in st.items()}
                               for i, st in engine.optimizer.state_dict()["state"].items()}}
    engine.close()
    return {"stage": engine.stage, "states": states}


def convert_offline(root):
    return {stage: dense_state_from_persisted(
        root / "disk" / "replay", stage=stage, start_iteration=4, layers=build_gpt_moe_layers(MODEL),
        num_stages=STAGES, loss_fn=gpt_moe_loss, optimizer=optimizer, config=config("fp32", 3, "/unused"),
        data=data(), module_seed=2) for stage in range(STAGES)}


def test_offline_converter_rebuilds_each_stage_from_disk_alone(tmp_path):
    ranks = run_workers(train_persisted, nproc=STAGES, args=(tmp_path, 8), timeout_s=180)
    shutil.rmtree(tmp_path / "shm")  # nothing in memory: disk only
    converted = run_workers(convert_offline, nproc=1, args=(tmp_path,), timeout_s=180)[0]
    for r in ranks:
        dense = converted[r["stage"]]
        assert dense["iteration"] == 6
        live = r["states"][6]
        assert all(torch.equal(dense["model"][k], v) for k, v in live["model"].items())
        assert all(torch.equal(dense["optimizer"]["state"][i][k], v)
                   for i, st in live["optim"].items() for k, v in st.items())


def test_replay_refuses_a_data_parallel_window_without_its_replica_group():
    image, _ = make_image(stage=0)
    image.manifest = dataclasses.replace(image.manifest, extra={"data_parallel": 2})
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), STAGES, loss_fn=gpt_moe_loss, stage_id=0)
    with pytest.raises(moetion.MoetionError, match="trained with 2 data-parallel replica.s. but 1 replay"):
        replay_stage(module=module, optimizer=optimizer(module.parameters()), config=config("fp32", 3, "/x"),
                     window=image, logs=LogReader({}, stage=0), data=data(), until=10)


def replay_replica_group(ranks, stage, until):
    """One process per replica of ``stage``; they replay together over their own gloo group."""
    torch.distributed.init_process_group("gloo")
    replica = torch.distributed.get_rank()
    mine = next(r for r in ranks if (r["stage"], r["replica"]) == (stage, replica))
    logs = {}
    for other in ranks:  # this replica's pipeline only: 2 stages, so the other stage is neighbour and tie
        if other["replica"] == replica and other["stage"] != stage:
            logs[other["stage"]] = LogStore()
            logs[other["stage"]].import_(other["logs"])
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss, seed=2, stage_id=stage)
    opt = optimizer(module.parameters())
    replay_stage(module=module, optimizer=opt, config=config("fp32", None, "/unused"),
                 window=WindowImage(WindowManifest.from_json(mine["manifest"]), mine["blob"]),
                 logs=LogReader(logs, stage=stage), data=data(), until=until,
                 replica_group=torch.distributed.group.WORLD)
    return {"stage": stage, "replica": replica, "model": module.state_dict(), "optim": opt.state_dict()["state"]}


def test_data_parallel_stage_is_rebuilt_by_its_replica_group(tmp_path):
    ranks = run_workers(train, nproc=4, args=("fp32", 3, 8, tmp_path, None, 2), timeout_s=180)
    for stage in range(2):
        rebuilt = run_workers(replay_replica_group, nproc=2, args=(ranks, stage, 7), timeout_s=180)
        for mine in rebuilt:
            live = next(r for r in ranks if (r["stage"], r["replica"]) == (mine["stage"], mine["replica"]))
            assert all(torch.equal(mine["model"][k], v) for k, v in live["model"].items()), (stage, mine["replica"])
            assert all(torch.equal(mine["optim"][i][k], v) for i, st in live["optim"].items() for k, v in st.items())
