"""Expert parallelism: placement, bad input, and a PP x EP run equal to the unsharded model's training."""
import shutil
from pathlib import Path

import pytest
import torch

import moetion
from moetion.errors import ConfigError
from moetion.expert_parallel import ExpertShard, check_model
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.moe import MoELayer
from moetion.reference import train_reference
from moetion.snapshot.persist import load_persisted
from moetion.topology import PipeTopology

MODEL = GPTMoEConfig(seq_len=16, d_model=32, n_heads=2, n_layers=2, d_hidden=64, num_experts=4,
                     top_k=2, capacity_factor=1.0, router_noise=0.1, dropout=0.1)
ITERATIONS = 4
# A survivor of an EP kill has been seen (about 1 run in 20 under load) in a gloo all-to-all whose
# partly written send its closed connection never woke (docs/timeouts-and-spares.md): such a wait
# ends only at peer_timeout_s, so the heal test keeps it well below pytest's 300 s.
EP_PEER_TIMEOUT_S = 45.0


def test_expert_groups_are_consecutive_replicas_and_experts_are_placed_in_blocks():
    topology = PipeTopology(num_stages=2, data_parallel=4, expert_parallel=2)
    assert topology.expert_group_ranks(1, 0) == [4, 5] and topology.expert_group_ranks(1, 1) == [6, 7]
    assert topology.expert_data_ranks(0, 1) == [1, 3]
    assert [topology.expert_rank_of(r) for r in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert list(ExpertShard(size=2, rank=1).local_experts(8)) == [4, 5, 6, 7]
    assert ExpertShard(size=4, rank=0).owner(5, 8) == 2


def test_a_sharded_layer_keeps_its_block_under_the_unsharded_names():
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss, stage_id=0, seed=11,
                                    ep_size=2, expert_rank=1)
    whole = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss, stage_id=0, seed=11)
    mine, full = module.state_dict(), whole.state_dict()
    experts = sorted({k.split(".experts.")[1].split(".")[0] for k in mine if ".experts." in k})
    assert experts == ["2", "3"]
    assert all(torch.equal(v, full[k]) for k, v in mine.items())
    assert set(full) - set(mine) == {k for k in full if ".experts.0." in k or ".experts.1." in k}


def test_bad_expert_parallel_settings_are_refused_before_any_process_group(monkeypatch):
    with pytest.raises(ConfigError, match="ep_size=3 does not divide the 4 data-parallel replicas"):
        PipeTopology(num_stages=2, data_parallel=4, expert_parallel=3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")  # 2 stages x 3 replicas
    with pytest.raises(ConfigError, match="ep_size=2 does not divide the 3 data-parallel replicas"):
        moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss, ep_size=2)
    layers = build_gpt_moe_layers(GPTMoEConfig(seq_len=8, d_model=8, n_heads=2, n_layers=2, d_hidden=8, num_experts=6))
    with pytest.raises(ConfigError, match="ep_size=4 does not divide the 6 experts of layer"):
        moetion.PipelineModule(layers, 2, stage_id=0, ep_size=4, expert_rank=0)
    dense = [moetion.LayerSpec(torch.nn.Linear, 4, 4) for _ in range(2)]
    with pytest.raises(ConfigError, match="the model has no moetion.moe.MoELayer"):
        moetion.PipelineModule(dense, 2, stage_id=0, ep_size=2, expert_rank=0)
    with pytest.raises(ConfigError, match="shards only moetion.moe.MoELayer"):
        check_model([torch.nn.ModuleDict({"router": torch.nn.Linear(4, 2), "experts": torch.nn.ModuleList(
            torch.nn.Linear(4, 4) for _ in range(2))}), MoELayer(4, 4, 2)], ep_size=2)


def test_the_demo_refuses_an_expert_parallel_size_before_forking():
    from moetion.demo import DemoSettings

    with pytest.raises(ConfigError, match="--expert-parallel 2 must divide --data-parallel 3"):
        DemoSettings(stages=2, data_parallel=3, expert_parallel=2).check()
    with pytest.raises(ConfigError, match="--expert-parallel 3 must divide the demo model's 4 experts"):
        DemoSettings(stages=2, data_parallel=3, expert_parallel=3).check()
    DemoSettings(stages=2, data_parallel=4, expert_parallel=2).check()


# -- a real run: 2 stages x 2 replicas, experts split over the 2 replicas of each stage ------------------

def engine_config(snapshot: dict | None = None, precision: str = "fp32") -> moetion.Config:
    return moetion.Config.from_dict({
        "seed": 3, "micro_batches": 3, "grad_clip": 0.5, "threads": 1, "precision": precision,
        "lr_schedule": {"warmup_iterations": 1, "decay": "cosine", "decay_iterations": 3, "min_ratio": 0.1},
        "snapshot": snapshot or {},
    })


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def data():
    return moetion.ByteCorpus(moetion.data.stdlib_corpus(max_bytes=1 << 16), seq_len=MODEL.seq_len,
                              micro_batch_size=4, seed=5)


def named_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {name: dict(opt.state[p]) for name, p in module.named_parameters() if p in opt.state}


def expert_parallel_rank(shm_dir: str, precision: str) -> dict:
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss, seed=11, ep_size=2)
    snapshot = {"enabled": True, "window": 2, "shm_dir": shm_dir, "run_id": "ep"}
    engine = moetion.initialize(module, optimizer=optimizer, config=engine_config(snapshot, precision))
    source = data()
    losses, clip = [], []
    for _ in range(ITERATIONS):
        losses.append(engine.train_batch(source))
        clip.append(engine.last_stats.clip_coef)
    engine.checkpointer.drain(timeout_s=60)
    captured = [n for slot in engine.checkpointer.last_complete.slots for n in slot]
    popularity = dict(engine.checkpointer._popularity_now)
    engine.close()
    return {"stage": engine.stage, "losses": losses, "clip": clip, "model": module.state_dict(),
            "optim": named_optimizer_state(module, engine.optimizer), "captured": captured,
            "popularity": popularity}


def reference(precision: str) -> dict:
    run = train_reference(layers=build_gpt_moe_layers(MODEL), num_stages=2, loss_fn=gpt_moe_loss,
                          optimizer=optimizer, config=engine_config(precision=precision), data=data(), iterations=ITERATIONS,
                          data_parallel=2, module_seed=11)
    return {"losses": run.losses, "models": [s.state_dict() for s in run.stages],
            "optims": [named_optimizer_state(s, o) for s, o in zip(run.stages, run.optimizers)]}


def assert_same(actual: dict, expected: dict, what: str) -> None:
    for key, a in actual.items():
        e = expected[key]
        if isinstance(a, dict):
            assert_same(a, e, f"{what}.{key}")
        else:
            assert torch.equal(a, e), f"{what}.{key} differs: max |diff| {(a.double() - e.double()).abs().max():.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_stages_with_experts_split_over_two_replicas_equal_unsharded_training(tmp_path, precision):
    ranks = run_workers(expert_parallel_rank, nproc=4, args=(str(tmp_path / "shm"), precision), timeout_s=120)
    expected = run_workers(reference, nproc=1, args=(precision,), timeout_s=120)[0]
    for stage in range(2):
        pair = [r for r in ranks if r["stage"] == stage]
        for rank in pair:
            assert rank["losses"] == expected["losses"]
            assert_same(rank["model"], expected["models"][stage], f"stage {stage} weights")
            assert_same(rank["optim"], expected["optims"][stage], f"stage {stage} optimizer")
        owned = [{k for k in r["model"] if ".experts." in k} for r in pair]
        assert not owned[0] & owned[1], "an expert is held by both expert-parallel ranks"
        assert set(pair[0]["model"]) | set(pair[1]["model"]) == set(expected["models"][stage])
        assert set(pair[0]["optim"]) | set(pair[1]["optim"]) == set(expected["optims"][stage])
        for rank, experts in zip(pair, owned):  # each rank snapshots its own experts, counted over the stage
            held = {k.rsplit(".experts.", 1)[0] + ".experts." + k.split(".experts.")[1].split(".")[0] for k in experts}
            assert {n for n in rank["captured"] if ".experts." in n} == held
            assert set(rank["popularity"]) == held
        # Popularity counts the stage's tokens (both replicas'), here of the last iteration only (W=2).
        layers = {k.split(".experts.")[0] for k in owned[0]}
        routed = MODEL.top_k * 3 * 4 * MODEL.seq_len * 2  # choices x micro-batches x rows x tokens x replicas
        assert sum(p for rank in pair for p in rank["popularity"].values()) == routed * len(layers)
    assert min(min(r["clip"]) for r in ranks) < 1.0, "clipping never engaged: the sharded grad norm went unchecked"
    assert expected["losses"][-1] < expected["losses"][0]


@pytest.mark.slow
def test_a_killed_expert_parallel_rank_heals_from_the_live_replica_holding_its_experts(tmp_path):
    """One stage x 4 replicas, experts split over 2 (expert ranks 0 1 0 1): rank 1, killed at backward,
    copies rank 3's state (rank 0's would not load: other experts), and the run ends bit-identical."""
    from moetion.demo import DemoSettings
    from moetion.harness.runner import FaultHarness, Job

    demo = DemoSettings(iterations=5, stages=1, data_parallel=4, expert_parallel=2, micro_batches=2,
                        micro_batch_size=2, window=2, progress=False, lr=1e-2, peer_timeout_s=EP_PEER_TIMEOUT_S)
    report = FaultHarness(Job(demo=demo), work_dir=tmp_path, timeout_s=400).run(["stage=0,iter=3,phase=backward,replica=1"])
    assert report.verdict.identical, "\n".join(report.lines())
    (timeline,) = [t for t in report.timelines if not t.superseded]
    assert list(timeline.sources.values()) == ["replica"] and timeline.survivor_lost_iterations == 0


@pytest.fixture(scope="module")
def ep_group(tmp_path_factory):
    """2 stages x 2 replicas, each stage's experts split over both: no expert has a second copy."""
    from moetion.demo import DemoSettings
    from moetion.harness.runner import FaultHarness, Job

    work = tmp_path_factory.mktemp("ep")
    demo = DemoSettings(iterations=12, stages=2, data_parallel=2, expert_parallel=2, micro_batches=2,
                        micro_batch_size=2, window=3, progress=False, lr=1e-2, persist_dir=str(work / "disk"))
    return FaultHarness(Job(demo=demo), work_dir=work, timeout_s=400)


@pytest.mark.slow
def test_a_killed_expert_parallel_rank_replays_with_its_group_at_backward_step_and_forward(ep_group):
    """Three kills in one run, each of a rank whose experts have no other copy, so the survivor of
    its expert-parallel group replays with it (each from its own window in shared memory, the
    all-to-all and the gradient average live between them): rank 3 at backward in iteration 5
    (from window 1..3), rank 0 after iteration 7's commit point, then rank 1, which replayed with
    it, at forward in iteration 9 (both from window 4..6, which the replaced rank 0 restored from)."""
    report = ep_group.run(["stage=1,iter=5,phase=backward,replica=1", "stage=0,iter=7,phase=step,replica=0",
                           "stage=0,iter=9,phase=forward,replica=1"])
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert [t.ranks for t in restored] == [[3], [0], [1]], "\n".join(report.lines())
    assert [list(t.sources.values()) for t in restored] == [["shm"]] * 3
    # Iterations 2..4 (window 1..3's first is restored, not replayed); 5..7 and 5..8 from window 4..6.
    assert [t.replayed_stage_iterations for t in restored] == [t.survivor_replayed_iterations for t in restored]
    assert [t.replayed_stage_iterations for t in restored] == [3, 3, 4], "\n".join(report.lines())


@pytest.mark.slow
def test_an_expert_parallel_group_replays_from_a_window_all_its_replicas_kept_or_the_initial_state(ep_group):
    """Four kills where a survivor's newest window is not the lost rank's: each replica keeps the
    windows from the newest one every replica of its stage holds (and the initial state until one
    is), so the group finds a common start. Rank 1 at forward in iteration 2 (no window yet: stage 0
    from the initial state); rank 3 at backward in iteration 5 (from window 1); rank 2 at forward in
    iteration 9: rank 3 skipped window 4..6, so rank 2 kept window 1 besides 4 and they replay from
    1; rank 0 at forward in iteration 10, just after window 7..9's end, published or not by the lost
    rank (rank 1 kept window 4 until both hold 7: from 4 or 7, as far as the publishing got)."""
    report = ep_group.run(["stage=0,iter=2,phase=forward,replica=1", "stage=1,iter=5,phase=backward,replica=1",
                           "stage=1,iter=9,phase=forward,replica=0", "stage=0,iter=10,phase=forward,replica=0"])
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert [t.ranks for t in restored] == [[1], [3], [2], [0]], "\n".join(report.lines())
    sources = [list(t.sources.values()) for t in restored]
    assert sources == [["initial"], ["shm"], ["shm"], ["shm"]], "\n".join(report.lines())
    # Iterations 0..1 from the initial state; 2..4 and 2..8 from window 1..3; 5..9 or 8..9.
    replayed = [t.replayed_stage_iterations for t in restored]
    assert replayed[:3] == [2, 3, 7] and replayed[3] in (5, 2), "\n".join(report.lines())
    assert replayed == [t.survivor_replayed_iterations for t in restored]
    # Rank 2 replayed with rank 3 in the middle of window 4..6 (its optimizer state tensors were
    # replaced): the rest of that window copied the replayed ones, so it equals the fault-free run's.
    runs = {int(path.name.split("-")[2]): path for path in Path(ep_group.job.demo.persist_dir).iterdir()}
    expected, actual = (load_persisted(runs[n], stage=1, replica=0, iteration=4) for n in (min(runs), max(runs)))
    for before, after in zip(expected.manifest.captures, actual.manifest.captures, strict=True):
        for e, a in zip(before.entries, after.entries, strict=True):
            assert (e.param, e.role) == (a.param, a.role) and torch.equal(expected.tensor(e), actual.tensor(a)), \
                f"window 4..6, capture {after.iteration}: {a.param} {a.role} differs from the fault-free run's"


@pytest.mark.slow
def test_negative_control_one_all_to_all_chunk_perturbed_in_replay_is_a_mismatch(ep_group, monkeypatch):
    from moetion import expert_parallel, replay

    replaying = []
    exchange = expert_parallel.exchange

    def perturbed(x, group):
        out = exchange(x, group)
        if replaying and out.is_floating_point() and len(replaying) == 1:
            replaying.append("done")
            out[0] += 1e-3  # one row of one chunk, once
        return out

    monkeypatch.setattr(expert_parallel, "exchange", perturbed)
    replay.adapt_replay_ports(lambda ports: (replaying.append("on"), ports)[1])
    try:
        report = ep_group.run(["stage=1,iter=5,phase=backward,replica=1"])
    finally:
        replay.clear_replay_port_adapters()
    assert not report.verdict.identical and not report.verdict.weights_equal


def persisted_rank(root: str) -> int:
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss, seed=11, ep_size=2)
    config = engine_config({"enabled": True, "window": 2, "shm_dir": f"{root}/shm", "run_id": "ep",
                            "persist_dir": f"{root}/disk"})
    config.upstream_log.enabled = True
    engine = moetion.initialize(module, optimizer=optimizer, config=config)
    source = data()
    while engine.iteration < 5:
        engine.train_batch(source)
    engine.close()
    return engine.dist.rank


def reference_at(iterations: int) -> dict:
    run = train_reference(layers=build_gpt_moe_layers(MODEL), num_stages=2, loss_fn=gpt_moe_loss,
                          optimizer=optimizer, config=engine_config(), data=data(), iterations=iterations,
                          data_parallel=2, module_seed=11)
    return {k: v for stage in run.stages for k, v in stage.state_dict().items()}


@pytest.mark.slow
def test_export_gathers_every_expert_from_its_rank_and_refuses_a_missing_one(tmp_path):
    from moetion.export import ExportError, JobSpec, export_run
    from moetion.snapshot.inspect import inspect_dir
    from moetion.snapshot.persist import window_path

    run_workers(persisted_rank, nproc=4, args=(str(tmp_path),), timeout_s=120)
    torch.set_num_threads(1)  # the export forks: no OpenMP pool in this process
    job = JobSpec(layers=build_gpt_moe_layers(MODEL), num_stages=2, loss_fn=gpt_moe_loss, optimizer=optimizer,
                  data=data(), module_seed=11)
    run_dir = tmp_path / "disk" / "ep"
    summary = export_run(run_dir, tmp_path / "dense.pt", job=job, progress=lambda _: None)
    exported = torch.load(tmp_path / "dense.pt", weights_only=True)["model"]
    expected = run_workers(reference_at, nproc=1, args=(summary["iteration"] + 1,), timeout_s=120)[0]
    assert summary["iteration"] >= 2 and exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], v) for k, v in expected.items()), "the export differs from EP=1 training"

    placement = {(row["stage"], row["replica"]): row["experts"] for row in inspect_dir(run_dir, verify=False)
                 if row["start_iteration"] == summary["start_iteration"]}
    assert placement == {(s, 0): "0,1 (ep rank 0/2)" for s in range(2)} | {(s, 1): "2,3 (ep rank 1/2)" for s in range(2)}
    start = summary["start_iteration"]
    shutil.rmtree(window_path(run_dir, stage=1, replica=1, start_iteration=start))
    with pytest.raises(ExportError, match=r"replica 1 of stage 1 has no window .* experts \[2, 3\] of layer layers\.\d\.moe"):
        export_run(run_dir, tmp_path / "again.pt", job=job, progress=lambda _: None)
