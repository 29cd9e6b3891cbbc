"""Issue 19, finding 3: a reused run id never breaks a new job. A fresh job refuses a run directory
holding another job's windows (nothing adopted, pruned or overwritten); ``--resume`` continues that
run under its recorded job nonce."""
import json
from pathlib import Path

import pytest
import torch

import moetion
from moetion.errors import LaunchError
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.snapshot.persist import list_persisted

MODEL = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_hidden=16, num_experts=2)


def train(root, iterations):
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), 2, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 2, "upstream_log": {"enabled": True},
        "snapshot": {"enabled": True, "window": 2, "run_id": "reused", "shm_dir": str(root / "shm"),
                     "persist_dir": str(root / "disk")}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    start = engine.load_checkpoint(data) if moetion.resume_requested() else 0
    for _ in range(start, iterations):
        engine.train_batch(data)
    engine.close()
    return {"start": start, "nonce": engine.checkpointer.identity.job_nonce}


def snapshot_of(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fresh_job_refuses_another_jobs_run_and_resume_continues_it(tmp_path):
    run_dir = tmp_path / "disk" / "reused"
    first = run_workers(train, nproc=2, args=(tmp_path, 5), timeout_s=120)
    recorded = json.loads((run_dir / "config.json").read_text())["job_nonce"]
    assert {r["nonce"] for r in first} == {recorded}
    before = snapshot_of(run_dir)
    assert {w.start_iteration for w in list_persisted(run_dir)} == {1, 3}

    with pytest.raises(LaunchError, match=r"already holds run 'reused' of another job .*pass --resume"):
        run_workers(train, nproc=2, args=(tmp_path, 5), timeout_s=120, grace_s=5)
    assert snapshot_of(run_dir) == before, "the refused job changed nothing: no window pruned, config.json kept"

    resumed = run_workers(train, nproc=2, args=(tmp_path, 7), timeout_s=120, env={"MOETION_RESUME": "1"})
    assert [r["start"] for r in resumed] == [5, 5] and {r["nonce"] for r in resumed} == {recorded}
    assert {w.job_nonce for w in list_persisted(run_dir)} == {recorded}
    assert (run_dir / "config.json").read_bytes() == before[Path("config.json")], "resume keeps the run's config"
