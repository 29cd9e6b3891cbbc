"""``moetion export``: a persisted run becomes one dense state dict equal, bit for bit, to the same
model trained without pipeline parallelism; bad inputs are clear errors that leave nothing at OUT."""
import dataclasses
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import moetion
from moetion.export import ExportError, JobSpec, export_run, verify_export
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.reference import train_reference
from window_image_helpers import rewrite_manifest

pytestmark = pytest.mark.slow  # real ranks over gloo

STAGES, SEED = 4, 2
MODEL = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_hidden=32, num_experts=4,
                     capacity_factor=1.0, router_noise=0.1, dropout=0.1)


def config(root=None):
    return moetion.Config.from_dict({
        "seed": 9, "micro_batches": 4, "precision": "fp32", "grad_clip": 0.5, "threads": 1,
        "lr_schedule": {"warmup_iterations": 2, "decay": "cosine", "decay_iterations": 10, "min_ratio": 0.1},
        "snapshot": {"enabled": True, "window": 3, "run_id": "replay",
                     "shm_dir": str(root / "shm") if root else "/unused",
                     "persist_dir": str(root / "disk") if root else None},
        "upstream_log": {"enabled": True},
    })


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def data():
    return moetion.ByteCorpus(moetion.data.stdlib_corpus(max_bytes=1 << 16), seq_len=8, micro_batch_size=2, seed=4)


def job(model=MODEL):
    """The JobSpec of the trained run (also ``--job test_export:job`` for the CLI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # building the data must not start an OpenMP pool in a process that forks
    try:
        return JobSpec(layers=build_gpt_moe_layers(model), num_stages=STAGES, loss_fn=gpt_moe_loss,
                       optimizer=optimizer, data=data(), module_seed=SEED)
    finally:
        torch.set_num_threads(threads)


def train(root, iterations):
    module = moetion.PipelineModule(build_gpt_moe_layers(MODEL), STAGES, loss_fn=gpt_moe_loss, seed=SEED)
    engine = moetion.initialize(module, optimizer=optimizer, config=config(root))
    source = data()
    for _ in range(iterations):
        engine.train_batch(source)
    engine.close()


def reference(iterations):
    """The single-process ground truth, merged like an export: {"model": ..., "optimizer": {stage: state}}."""
    torch.set_num_threads(1)
    run = train_reference(layers=build_gpt_moe_layers(MODEL), num_stages=STAGES, loss_fn=gpt_moe_loss,
                          optimizer=optimizer, config=config(), data=data(), iterations=iterations, module_seed=SEED)
    model = {}
    for stage in run.stages:
        for name, value in stage.state_dict().items():
            assert name not in model or torch.equal(model[name], value), f"tied copies of {name} differ"
            model.setdefault(name, value)
    return {"model": model, "optimizer": {s: opt.state_dict()["state"] for s, opt in enumerate(run.optimizers)}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One persisted run (W=3, 8 iterations: windows start at 1 and 4) and its references at 3 and 6."""
    root = tmp_path_factory.mktemp("export-run")
    run_workers(train, nproc=STAGES, args=(root, 8), timeout_s=180)
    shutil.rmtree(root / "shm", ignore_errors=True)
    refs = {t: run_workers(reference, nproc=1, args=(t + 1,), timeout_s=180)[0] for t in (3, 6)}
    return root / "disk" / "replay", refs


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def assert_matches(path, expected, *, with_optimizer=False):
    dense = torch.load(path, weights_only=True)
    assert set(dense["model"]) == set(expected["model"])
    bad = [name for name, value in expected["model"].items() if not torch.equal(dense["model"][name], value)]
    assert bad == []
    if with_optimizer:
        for stage, state in expected["optimizer"].items():
            for index, entry in state.items():
                assert all(torch.equal(dense["optimizer"][stage]["state"][index][k], v) for k, v in entry.items())
    return dense


def test_export_equals_unpipelined_training(trained, tmp_path):
    run_dir, refs = trained
    lines = []
    summary = export_run(run_dir, tmp_path / "dense.pt", job=job(), with_optimizer=True, verify=True,
                         progress=lines.append)
    assert summary["iteration"] == 6 and summary["stages"] == STAGES and summary["bytes"] > 0
    dense = assert_matches(tmp_path / "dense.pt", refs[6], with_optimizer=True)
    assert dense["iteration"] == 6 and dense["run_id"] == "replay"
    assert sorted(os.listdir(tmp_path)) == ["dense.pt"], "no temporary files left behind"


def test_dcp_directory_holds_the_same_model(trained, tmp_path):
    run_dir, _ = trained
    export_run(run_dir, tmp_path / "dense.pt", job=job(), dcp_dir=tmp_path / "dcp", progress=lambda _: None)
    model = torch.load(tmp_path / "dense.pt", weights_only=True)["model"]
    loaded = {"model": {name: torch.zeros_like(t) for name, t in model.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"))
    assert all(torch.equal(loaded["model"][name], t) for name, t in model.items())
    with pytest.raises(ExportError, match="already exists"):
        export_run(run_dir, tmp_path / "again.pt", job=job(), dcp_dir=tmp_path / "dcp", progress=lambda _: None)
    assert not (tmp_path / "again.pt").exists()


def test_iteration_picks_an_older_window(trained, tmp_path):
    run_dir, refs = trained
    summary = export_run(run_dir, tmp_path / "old.pt", job=job(), iteration=1, workers=1, progress=lambda _: None)
    assert summary["iteration"] == 3
    assert "optimizer" not in assert_matches(tmp_path / "old.pt", refs[3])


def _remove_stage(run):
    shutil.rmtree(run / "stage-002")


def _flip_blob_byte(run):
    with open(run / "stage-001/replica-000/window-0000000004/blob.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate_blob(run):
    path = run / "stage-003/replica-000/window-0000000004/blob.bin"
    os.truncate(path, path.stat().st_size - 8)


def _flip_logs_byte(run):
    path = run / "stage-001/replica-000/window-0000000004/logs.bin"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _window_of_another_run(run):
    rewrite_manifest(run / "stage-002/replica-000/window-0000000004/manifest.json", run_id="other-run")


def _remove_config(run):
    (run / "config.json").unlink()


@pytest.mark.parametrize("damage, options, message", [
    (_remove_stage, {}, r"stage-002: stage 2 has no persisted window"),
    (_flip_blob_byte, {}, r"stage 1 .*stage-001/replica-000/window-0000000004/blob\.bin"),
    (_truncate_blob, {}, r"stage-003/replica-000/window-0000000004/blob\.bin: truncated"),
    (_flip_logs_byte, {}, r"stage-001/replica-000/window-0000000004/logs\.bin: corrupted upstream logs"),
    (_window_of_another_run, {}, r"stage-002/.*manifest\.json: window of run 'other-run' in run 'replay'"),
    (_remove_config, {}, r"config\.json: missing"),
    (None, {"iteration": 2}, r"stage 0 has no window starting at iteration 2 \(its windows start at \[1, 4\]\)"),
    (None, {"job": job(dataclasses.replace(MODEL, n_layers=6))}, r"stage \d .*do not match the model"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(run_copy, tmp_path, damage, options, message):
    if damage:
        damage(run_copy)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ExportError, match=message):
        export_run(run_copy, out_dir / "dense.pt", **{"job": job(), "progress": lambda _: None, **options})
    assert list(out_dir.iterdir()) == [], "nothing at OUT, no temporary files"


def test_cli_exports_and_verify_catches_a_corrupted_output(trained, tmp_path):
    run_dir, refs = trained
    out = tmp_path / "cli.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "moetion.cli", "export", str(run_dir), str(out),
                           "--job", "test_export:job", "--verify"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("stage ")) == \
        [f"stage {s}/{STAGES}" for s in range(STAGES)]
    assert "(verified)" in done.stdout
    dense = assert_matches(out, refs[6])
    assert verify_export(out) == len(dense["model"])
    name = sorted(dense["model"])[0]
    dense["model"][name] = dense["model"][name].clone()
    dense["model"][name].view(-1)[0] += 1
    torch.save(dense, out)
    with pytest.raises(ExportError, match=f"cli.pt: tensor {name} is corrupted"):
        verify_export(out)
    failed = subprocess.run([sys.executable, "-m", "moetion.cli", "export", str(tmp_path / "nowhere"), str(out),
                             "--job", "test_export:job"], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stderr.startswith("moetion export: error: ")
