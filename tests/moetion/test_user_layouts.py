"""The user's own MoE layouts (a ModuleList of user-class experts, stacked [E, ...] tensors found by
detection, stacked tensors declared through moetion.experts) and state besides parameters (batch
norm statistics, an expert-bias buffer moved by an optimizer step pre-hook), in one 3-stage model:

- the pipeline equals the single-process reference bit for bit (weights, buffers, optimizer state);
- every stage is rebuilt bit for bit from a W=4 window and its neighbours' logs, replaying through
  frozen slices of stacked tensors, with a plain and a ``foreach`` optimizer;
- a replay whose frozen slices keep the optimizer's update (not restored) is caught."""
import pytest
import torch

import moetion
from logging_store import LogStore
from moetion import replay
from moetion.iteration import StepHooks
from moetion.launcher import run_workers
from moetion.reference import train_reference
from moetion.replay import replay_stage
from moetion.run_identity import fresh_job_nonce
from moetion.snapshot.image import WindowImage, WindowManifest
from moetion.snapshot.shm import SharedMemoryTier
from moetion.upstream_log import LogReader

import layout_models as models

pytestmark = pytest.mark.slow  # real ranks over gloo

STAGES = 3
WINDOW = 4


def config(shm_dir, window=WINDOW, persist_dir=None):
    return moetion.Config.from_dict({
        "seed": 9, "micro_batches": 2, "grad_clip": 0.5, "threads": 1,
        "snapshot": {"enabled": True, "window": window, "shm_dir": str(shm_dir), "run_id": "layouts",
                     "persist_dir": persist_dir},
        "upstream_log": {"enabled": True},
    })


def build(stage=None):
    return moetion.PipelineModule(models.layout_layers(STAGES), STAGES, loss_fn=models.mse,
                                  partition_method="uniform", seed=2, stage_id=stage)


def make_optimizer(kind):
    return lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=kind == "foreach")


def train(kind, iterations, shm_dir, grab_after, hook, persist_dir=None):
    module = build()
    engine = moetion.initialize(module, optimizer=make_optimizer(kind), config=config(shm_dir, persist_dir=persist_dir))
    if hook:
        models.balance_before_each_step(engine.optimizer, module)
    tier = SharedMemoryTier(shm_dir, run_id="layouts", job_nonce=fresh_job_nonce(), stage=engine.stage, replica=0)
    source, image, logs, losses = models.RegressionData(), None, [], []
    for t in range(iterations):
        losses.append(engine.train_batch(source))
        logs.append(engine.upstream.export(t, t + 1))
        if t == grab_after:
            engine.checkpointer.worker.fence()
            image = tier.load_complete()
            image.blob = image.blob.clone()
    engine.close()
    return {"stage": engine.stage, "logs": b"".join(logs), "losses": losses,
            "manifest": image.manifest.to_json() if image else None,
            "blob": image.blob[: image.manifest.blob_bytes].clone() if image else None,
            "model": module.state_dict(), "optim": engine.optimizer.state_dict()["state"],
            "token_counts": engine.expert_token_counts()}


class KeepOptimizerUpdateOfFrozenSlices(StepHooks):
    """Negative control: after each replayed step the frozen slices keep what the optimizer wrote."""

    def __init__(self, slots):
        self.slots = slots

    def after_step(self, iteration):
        frozen = self.slots.frozen_slices()
        kept = {(name, e): self.slots.masters[name][e].detach().clone() for name, e in frozen}
        self.slots.after_step(iteration)
        with torch.no_grad():
            for (name, e), value in kept.items():
                self.slots.masters[name][e].copy_(value)


def rebuild(ranks, kind, until, faulty):
    if faulty:
        replay.adapt_replay_ports(lambda ports: replay.ReplayPorts(
            ports.inputs, ports.outputs, ports.decisions, KeepOptimizerUpdateOfFrozenSlices(ports.hooks)))
    rebuilt = {}
    for r in ranks:
        stage = r["stage"]
        logs = {}
        for other in ranks:
            if abs(other["stage"] - stage) == 1:
                logs[other["stage"]] = LogStore()
                logs[other["stage"]].import_(other["logs"])
        image = WindowImage(WindowManifest.from_json(r["manifest"]), r["blob"])
        module = build(stage)
        opt = make_optimizer(kind)(module.parameters())
        models.balance_before_each_step(opt, module)
        replay_stage(module=module, optimizer=opt, config=config("/unused", None), window=image,
                     logs=LogReader(logs, stage=stage), data=models.RegressionData(), until=until)
        rebuilt[stage] = {"model": module.state_dict(), "optim": opt.state_dict()["state"]}
    return rebuilt


def differences(ranks, rebuilt):
    bad = []
    for r in ranks:
        mine = rebuilt[r["stage"]]
        bad += [f"stage {r['stage']} {n}" for n, v in r["model"].items() if not torch.equal(mine["model"][n], v)]
        bad += [f"stage {r['stage']} optimizer[{i}].{k}" for i, s in r["optim"].items() for k, v in s.items()
                if not torch.equal(mine["optim"][i][k], v)]
    return bad


@pytest.mark.parametrize("kind", ["plain", "foreach"])
def test_every_stage_is_rebuilt_through_frozen_slices_and_a_faulty_replay_is_caught(tmp_path, kind):
    # Window 1..4 is grabbed after iteration 5; replay 2..8 runs frozen slices at 2..4.
    ranks = run_workers(train, nproc=STAGES, args=(kind, 9, tmp_path, 5, True), timeout_s=180)
    manifests = [WindowManifest.from_json(r["manifest"]) for r in ranks]
    assert all(m.start_iteration == 1 and m.window == WINDOW for m in manifests)
    assert manifests[0].extra["operator_kinds"] == {"expert": 12, "router": 3, "dense": 0}
    sliced = [e for m in manifests for c in m.captures for e in c.entries if e.role == "weight" and ".experts." in e.operator
              and e.param.endswith((".w1", ".up"))]
    assert sliced and all(len(e.shape) == 2 for e in sliced), "stacked experts must be captured as slices"
    rebuilt = run_workers(rebuild, nproc=1, args=(ranks, kind, 8, False), timeout_s=180)[0]
    assert differences(ranks, rebuilt) == []
    if kind == "plain":
        broken = run_workers(rebuild, nproc=1, args=(ranks, kind, 8, True), timeout_s=180)[0]
        assert any(n.endswith((".w1", ".w2", ".up", ".down")) for n in differences(ranks, broken))


def reference(iterations):
    run = train_reference(layers=models.layout_layers(STAGES), num_stages=STAGES, loss_fn=models.mse,
                          optimizer=make_optimizer("plain"), config=config("/unused"), data=models.RegressionData(),
                          iterations=iterations, partition_method="uniform", module_seed=2)
    return {"losses": run.losses, "models": [s.state_dict() for s in run.stages],
            "optims": [o.state_dict()["state"] for o in run.optimizers]}


def test_the_pipeline_equals_the_single_process_reference(tmp_path):
    ranks = run_workers(train, nproc=STAGES, args=("plain", 5, tmp_path, None, False), timeout_s=180)
    expected = run_workers(reference, nproc=1, args=(5,), timeout_s=180)[0]
    for r in ranks:
        assert r["losses"] == expected["losses"]
        # Only GroupedMoE reports its routing (6 rows, top-2, 2 micro-batches); the others are of unknown popularity.
        grouped = [f"layers.{3 * r['stage'] + i}" for i in range(3) if (r["stage"] + i) % 4 == 1]
        assert sorted(r["token_counts"]) == grouped and all(int(c.sum()) == 24 for c in r["token_counts"].values())
        model = expected["models"][r["stage"]]
        assert [n for n, v in r["model"].items() if not torch.equal(model[n], v)] == []
        optim = expected["optims"][r["stage"]]
        assert [(i, k) for i, s in r["optim"].items() for k, v in s.items() if not torch.equal(optim[i][k], v)] == []


def test_export_writes_stacked_experts_back_under_the_users_own_keys(tmp_path):
    """Issue 17, item 6: the exported state dict is keyed like the user's model (``layers.1.w1`` a whole
    ``[E, d, h]`` tensor, not per-expert slices) and equals the reference's, buffers included."""
    from moetion.export import JobSpec, export_run
    run_workers(train, nproc=STAGES, args=("plain", 6, tmp_path / "shm", None, False, str(tmp_path / "disk")),
                timeout_s=180)
    job = JobSpec(layers=models.layout_layers(STAGES), num_stages=STAGES, loss_fn=models.mse,
                  optimizer=make_optimizer("plain"), data=models.RegressionData(), partition_method="uniform",
                  module_seed=2)
    summary = export_run(tmp_path / "disk" / "layouts", tmp_path / "dense.pt", job=job, workers=1, progress=lambda _: None)
    assert summary["iteration"] == 4  # the window 1..4
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)["model"]
    expected = {n: v for stage in run_workers(reference, nproc=1, args=(5,), timeout_s=180)[0]["models"]
                for n, v in stage.items()}
    assert dense["layers.1.w1"].shape == (models.EXPERTS, models.D_MODEL, models.HIDDEN)  # GroupedMoE, stacked
    assert dense["layers.2.up"].shape == (models.EXPERTS, models.D_MODEL, models.HIDDEN)  # DeclaredMoE, stacked
    assert "layers.0.experts.3.w_down.weight" in dense and "layers.5.norm.num_batches_tracked" in dense
    assert set(dense) == set(expected)
    assert [n for n, v in expected.items() if not torch.equal(dense[n], v)] == []
