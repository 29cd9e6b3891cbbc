"""Sparse snapshots over real multi-process training: every captured tensor equals the live
state at its capture iteration, every operator is fully captured exactly once per window, and all
ranks agree on windows; a SIGKILL mid-capture leaves the previous window intact in shared memory."""
import shutil
from pathlib import Path

import pytest
import torch

import moetion
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.job_secret import new_secret
from moetion.run_identity import fresh_job_nonce
from moetion.snapshot.image import SnapshotError
from moetion.snapshot.persist import load_persisted
from moetion.snapshot.shm import SharedMemoryTier

pytestmark = pytest.mark.slow  # real ranks over gloo

MODEL = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_hidden=32, num_experts=4, capacity_factor=1.0)


def train(num_stages, iterations, precision, window, shm_dir, record=True):
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), num_stages, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 2, "threads": 1, "precision": precision,
        "snapshot": {"enabled": True, "window": window, "shm_dir": str(shm_dir), "run_id": "test",
                     "persist_dir": str(shm_dir / "disk")}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    history, orders = {}, []
    for t in range(iterations):
        engine.train_batch(data)
        orders.append((engine.checkpointer.window_start, tuple(engine.checkpointer.order)))
        if record:
            opt = engine.optimizer
            history[t] = {
                **{(n, "weight"): p.detach().clone() for n, p in module.named_parameters()},
                **{(n, "compute"): p.detach().clone() for n, p in engine.precision.compute.named_parameters()},
                **{(n, f"optim.{k}"): v.clone() for n, p in module.named_parameters()
                   for k, v in opt.state[p].items()},
            }
    engine.close()
    ckpt = engine.checkpointer
    for (start_before, order_before), (start_after, order_after) in zip(orders, orders[1:]):
        assert order_before == order_after or start_before != start_after, "re-ordered inside a window"
    image = SharedMemoryTier(shm_dir, run_id="test", job_nonce=fresh_job_nonce(), stage=engine.stage,
                             replica=engine.dist.replica).load_complete()
    checked = 0
    for capture in image.manifest.captures:
        for entry in capture.entries:
            live = history[capture.iteration][(entry.param, entry.role)]
            assert torch.equal(image.tensor(entry), live), (capture.iteration, entry.param, entry.role)
            checked += 1
    fully = [e.operator for c in image.manifest.captures for e in c.entries if e.role == "weight"]
    fully = list(dict.fromkeys(fully))  # each operator's weights once per parameter, in capture order
    assert sorted(fully) == sorted(ckpt.operators), "every operator is fully captured in the window"
    per_capture = [{e.operator for e in c.entries if e.role == "weight"} for c in image.manifest.captures]
    assert sum(len(s) for s in per_capture) == len(ckpt.operators), "and exactly once"
    held = ckpt.replicator.held() if ckpt.replicator else None
    return {"stage": engine.stage, "replica": engine.dist.replica, "checked": checked,
            "manifest": image.manifest.to_json(), "held": held.manifest.to_json() if held else None,
            "held_blob_equal": held is not None and torch.equal(held.blob[: held.manifest.blob_bytes],
                                                                _source_blob(shm_dir, held.manifest)),
            "window": (image.manifest.start_iteration, image.manifest.window), "slots": image.manifest.slots,
            "completed": ckpt.windows_completed, "shm_bytes": ckpt.tier_bytes()["shm"]}


def _source_blob(shm_dir, manifest):
    """The window as the source stage keeps it in shared memory (same host in these tests)."""
    image = SharedMemoryTier(shm_dir, run_id="test", job_nonce=fresh_job_nonce(), stage=manifest.stage,
                             replica=manifest.replica).load_complete()
    return image.blob[: image.manifest.blob_bytes]


@pytest.mark.parametrize("num_stages, replicas, precision", [(4, 1, "fp32"), (2, 2, "bf16")])
def test_snapshots_equal_live_state_at_capture(tmp_path, num_stages, replicas, precision):
    ranks = run_workers(train, nproc=num_stages * replicas, args=(num_stages, 7, precision, 3, tmp_path),
                        timeout_s=120)
    for r in ranks:
        assert r["window"] == (4, 3) and r["completed"] == 2  # windows 1..3 and 4..6
        assert r["checked"] > 0 and r["shm_bytes"] > 0
    for stage in range(num_stages):
        slots = {r["slots"] for r in ranks if r["stage"] == stage}
        assert len(slots) == 1, "replicas of a stage agree on the slot plan"
    own = {r["manifest"] for r in ranks}
    for r in ranks:  # every rank holds a verified replica of another stage's latest window
        assert r["held"] in own and r["held"] != r["manifest"] and r["held_blob_equal"]
    shutil.rmtree(tmp_path / "test")  # shared memory gone: the disk copy still serves every stage
    for r in ranks:
        image = load_persisted(tmp_path / "disk" / "test", stage=r["stage"], replica=r["replica"])
        assert image.manifest.to_json() == r["manifest"]


def test_automatic_window_is_the_same_on_every_rank(tmp_path):
    ranks = run_workers(train, nproc=4, args=(4, 9, "fp32", None, tmp_path), timeout_s=120)
    assert len({r["window"] for r in ranks}) == 1, [r["window"] for r in ranks]


def test_sigkill_mid_capture_leaves_the_previous_window_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("MOETION_KILL", "stage=1,iter=6,phase=capture")  # last capture of window 4..6
    monkeypatch.setenv("MOETION_JOB_SECRET", new_secret())  # as an operator would: this process knows the job
    with pytest.raises(moetion.LaunchError, match="rank 1: killed by SIGKILL"):
        run_workers(train, nproc=2, args=(2, 8, "fp32", 3, tmp_path, False), timeout_s=120, grace_s=3)
    tier = SharedMemoryTier(tmp_path, run_id="test", job_nonce=fresh_job_nonce(), stage=1, replica=0)  # a fresh process
    image = tier.load_complete()
    assert (image.manifest.start_iteration, image.manifest.end_iteration) == (1, 3)
    # A partially written window never becomes "complete"; corrupting the complete one is detected.
    blob_path = next(Path(tier.directory).glob("window-0000000001.bin"))
    raw = bytearray(blob_path.read_bytes())
    raw[image.manifest.captures[0].entries[0].offset] ^= 0xFF
    blob_path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="checksum mismatch in iteration 1"):
        tier.load_complete()
