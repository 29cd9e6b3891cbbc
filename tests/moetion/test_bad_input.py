"""Bad input, tried as a new user would: each is a one-line error naming the key or flag, never a
traceback, and leaves nothing behind. The CLI rows run the real ``moetion`` command in a subprocess;
all of them fail before any rank starts, so they are fast."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moetion import Config, ConfigError

# ---------------------------------------------------------------------------------------- config

CONFIG_ROWS = [
    ({"seed": "0"}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
    ({"micro_batches": 2.5}, "micro_batches", "integer"),
    ({"micro_batches": "4"}, "micro_batches", "integer"),
    ({"grad_clip": math.nan}, "grad_clip", "finite"),
    ({"grad_clip": math.inf}, "grad_clip", "finite"),
    ({"grad_clip": "1.0"}, "grad_clip", "number"),
    ({"peer_timeout_s": True}, "peer_timeout_s", "number"),
    ({"threads": 1.0}, "threads", "integer"),
    ({"precision": 16}, "precision", "string"),
    ({"snapshot": {"enabled": "false"}}, "snapshot.enabled", "boolean"),
    ({"snapshot": {"enabled": 1}}, "snapshot.enabled", "boolean"),
    ({"snapshot": {"window": "3"}}, "snapshot.window", "integer"),
    ({"snapshot": {"replicate": "no"}}, "snapshot.replicate", "boolean"),
    ({"snapshot": {"shm_dir": 5}}, "snapshot.shm_dir", "string"),
    ({"snapshot": None}, "snapshot", "mapping"),
    ({"lr_schedule": {"min_ratio": math.nan}}, "lr_schedule.min_ratio", "finite"),
    ({"lr_schedule": {"warmup_iterations": 1.5}}, "lr_schedule.warmup_iterations", "integer"),
    ({"upstream_log": {"codec": "gzip"}}, "upstream_log.codec", "'none', 'lz4', 'zstd'"),
    ({"upstream_log": {"codec": "zstd", "level": 99}}, "upstream_log.level", "expected"),
    ({"upstream_log": {"shuffle": "true"}}, "upstream_log.shuffle", "boolean"),
    ({"upstream_log": {"budget_bytes": -1}}, "upstream_log.budget_bytes", ">= 0"),
    ({"upstream_log": {"budget_bytes": 1e9}}, "upstream_log.budget_bytes", "integer"),
]


@pytest.mark.parametrize("values, key, expected", CONFIG_ROWS, ids=[r[1] + "=" + repr(r[0]) for r in CONFIG_ROWS])
def test_config_value_of_the_wrong_type_is_an_error_naming_key_value_and_type(values, key, expected):
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(values)
    message = str(caught.value)
    assert key in message and expected in message and "\n" not in message, message


def test_config_values_of_the_right_type_still_load():
    config = Config.from_dict({"seed": 3, "grad_clip": 2, "snapshot": {"enabled": True, "window": None},
                               "upstream_log": {"enabled": True, "codec": "zstd", "level": 3, "budget_bytes": 0}})
    assert (config.seed, config.grad_clip, config.upstream_log.level) == (3, 2, 3)


# ------------------------------------------------------------------------------------------- CLI

KILL = "--kill"
CLI_ROWS = [
    # (argv, exit code, text the one-line message must hold: the offending flag or key)
    (["demo", KILL, "stage=9,iter=5,phase=forward"], 2, "--kill: kill spec 'stage=9,iter=5,phase=forward,replica=0': stage=9"),
    (["demo", KILL, "stage=1,iter=50,phase=forward"], 2, "iter=50 is outside this job's iterations (0..49)"),
    (["demo", "--data-parallel", "2", KILL, "stage=1,iter=5,phase=step,replica=2"], 2, "replica=2"),
    (["demo", KILL, "stage=1,iter=5,phase=lunch"], 2, "--kill: kill spec 'stage=1,iter=5,phase=lunch': phase must be"),
    (["demo", KILL, "stage=1,iter=5"], 2, "--kill: kill spec 'stage=1,iter=5': needs stage=, iter=, phase="),
    (["demo", KILL, "stage=1,iter=5,phase=persistence"], 2, "phase=persistence never fires without --persist-dir"),
    (["demo", "--no-snapshots"], 2, "needs sparse snapshots"),
    (["demo", "--iterations", "0"], 2, "argument --iterations: must be >= 1, got 0"),
    (["demo", "--iterations", "2.5"], 2, "argument --iterations: expected an integer"),
    (["demo", "--stages", "100"], 2, "--stages 100: the demo model has 10 layers"),
    (["demo", "--micro-batches", "0"], 2, "argument --micro-batches: must be >= 1"),
    (["demo", "--data-parallel", "0"], 2, "argument --data-parallel: must be >= 1"),
    (["demo", "--window", "0"], 2, "argument --window: must be >= 1"),
    (["faults", KILL, "stage=4,iter=1,phase=forward"], 2, "stage=4 is outside this job's stages (0..3)"),
    (["faults", KILL, "stage=0,iter=-1,phase=forward"], 2, "iter=-1"),
    (["faults", "--script", "train.py", KILL, "stage=0,iter=1,phase=forward"], 2, "needs --nproc"),
    (["faults", "--timeout", "0", KILL, "stage=0,iter=1,phase=forward"], 2, "argument --timeout"),
    (["plan", "--preset", "gpt-moe", "--mtbf", "10m", "--runs", "-1"], 2, "argument --runs: must be >= 0"),
    (["plan", "--json", "missing.json", "--mtbf", "10m"], 1, "--json missing.json: cannot read it"),
    (["plan", "--preset", "gpt-moe", "--mtbf", "ten minutes"], 1, "cannot read duration 'ten minutes'"),
    (["export", "run", "out.pt", "--job", "x:y", "--workers", "0"], 2, "argument --workers: must be >= 1"),
    (["export", "run", "out.pt", "--job", "x:y", "--iteration", "-3"], 2, "argument --iteration: must be >= 0"),
    (["launch", "--nproc", "0", "train.py"], 2, "argument --nproc: must be >= 1"),
    (["launch", "--nproc", "2", "--max-restarts", "-1", "train.py"], 2, "argument --max-restarts: must be >= 0"),
    (["launch", "--nproc", "2", "--heartbeat-timeout", "nan", "train.py"], 2, "argument --heartbeat-timeout"),
]


def _leftovers(directory: Path) -> list[str]:
    """What moetion left in a temporary directory (torch keeps caches of its own there)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("moetion"))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temporary directory of the test's own as the system's, to see what a command leaves behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(tmp_path)
    return tmp


@pytest.mark.parametrize("argv, code, text", CLI_ROWS, ids=[" ".join(r[0]) for r in CLI_ROWS])
def test_cli_bad_input_is_one_line_naming_the_flag_and_leaves_nothing(argv, code, text, private_tmp, capsys):
    from moetion.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    out, err = capsys.readouterr()
    assert rc == code, err
    assert err.startswith(f"moetion {argv[0]}: error: ") and err.count("\n") == 1, err
    assert text in err, err
    assert "Traceback" not in out + err
    assert _leftovers(private_tmp) == [], "the command left files behind"


@pytest.mark.slow  # a fresh interpreter importing torch: seconds, though no rank starts
def test_cli_errors_come_before_any_process_and_print_no_traceback(tmp_path):
    """The real command, once end to end: the kill is refused before the reference run starts."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "moetion.cli", "demo", "--kill", "stage=9,iter=5,phase=forward"],
                          env=env, capture_output=True, text=True, timeout=120)
    ours = _without_torch_log_lines(done.stderr)
    assert done.returncode == 2 and "Traceback" not in ours
    assert ours == ["moetion demo: error: --kill: kill spec 'stage=9,iter=5,phase=forward,replica=0': "
                    "stage=9 is outside this job's stages (0..3)"]
    assert "reference" not in done.stdout and _leftovers(tmp_path) == []


def _without_torch_log_lines(stderr: str) -> list[str]:
    """stderr without torch's own glog-style lines (``W1202 13:29:56.98 ... file.py:67] ...``): a
    third-party torch plugin that fails to register logs a traceback there at import time."""
    return [line for line in stderr.splitlines() if not re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d", line)]


def test_plan_warns_when_the_mtbf_leaves_no_useful_training(capsys):
    from moetion.cli import main

    assert main(["plan", "--preset", "gpt-moe", "--mtbf", "1s", "--runs", "0"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("moetion plan: warning: at MTBF 1s") and "check the unit" in err
    assert main(["plan", "--preset", "gpt-moe", "--mtbf", "1h", "--runs", "0"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("phase", ["capture", "replay", "persistence"])
def test_help_says_which_phases_fire_only_at_some_iterations(phase, capsys):
    from moetion.cli import main

    with pytest.raises(SystemExit):
        main(["faults", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{phase}: only" in help_text and "A kill that never fires fails the run" in help_text


@pytest.mark.slow
def test_a_kill_that_never_fires_fails_the_run_naming_it_and_leaves_no_temporary_directory(tmp_path):
    """W = 3 publishes windows only at their last iteration: a capture kill at iteration 1 never
    fires. The run fails naming it (the other kill did fire), and the harness's directory is gone."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "moetion.cli", "faults", "--iterations", "4", "--stages", "2", "--window", "3",
         "--kill", "stage=0,iter=1,phase=capture", "--kill", "stage=1,iter=2,phase=backward"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("moetion faults: error:")]
    assert "kill 'stage=0,iter=1,phase=capture,replica=0' never fired" in error and "LAST iteration" in error
    assert "stage=1,iter=2" not in error  # that one fired
    assert "Traceback" not in "\n".join(_without_torch_log_lines(done.stderr)) and "BIT-IDENTICAL" not in done.stdout
    assert _leftovers(tmp_path) == []


def test_demo_exits_nonzero_when_the_faulty_run_differs(monkeypatch, capsys):
    """``moetion demo`` maps the harness verdict to its exit status as ``moetion faults`` does."""
    import moetion.demo
    from moetion.cli import main

    verdicts = iter([False, True])
    monkeypatch.setattr(moetion.demo, "run_demo", lambda settings, kills: {"identical": next(verdicts)})
    assert main(["demo", "--iterations", "5", "--kill", "stage=1,iter=2,phase=forward"]) == 2
    assert main(["demo", "--iterations", "5", "--kill", "stage=1,iter=2,phase=forward"]) == 0


# ------------------------------------------------------------------------------- the fault log

def test_the_fault_log_reader_skips_torn_and_hostile_lines(tmp_path, caplog):
    from moetion.faults import FaultRecord, read_fault_log

    log = tmp_path / "kills.jsonl"
    good = {"rank": 1, "spec": "stage=1,iter=2,phase=forward,replica=0", "time": 12.5}
    log.write_text("\n".join([
        json.dumps(good),
        '{"rank": 2, "spec": "stage=2,iter=3,ph',  # torn by a SIGKILL mid-write
        "[1, 2, 3]", '{"rank": "0", "spec": 5, "time": "now"}', '{"rank": true, "spec": "x", "time": 1}',
        "[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
        "\x00\xff not json", "",
    ]))
    assert read_fault_log(log) == [FaultRecord(1, good["spec"], 12.5)]
    assert sum("is not a kill record" in r.getMessage() for r in caplog.records) == 6
    assert read_fault_log(tmp_path / "missing.jsonl") == []


# -------------------------------------------------------------------------------- wire sizes

HUGE = 1 << 45  # 32 TiB


def _forge_or_receive() -> list[str]:
    """Rank 0 forges what each receiver reads first; rank 1 receives through moetion's own code
    and returns the error each receive raised (the test checks they are PeerFailures naming rank 0)."""
    import resource

    import torch
    import torch.distributed as dist

    from moetion.distributed import init_process_group
    from moetion.errors import PeerFailure
    from moetion.p2p import StageLinks
    from moetion.recovery import transfer
    from moetion.snapshot.replica import MAGIC, recv_image

    init_process_group(timeout_s=60)
    forged = [
        torch.tensor([HUGE]), torch.tensor([-5]),  # recv_bytes sizes
        torch.tensor([MAGIC, 10, HUGE]), torch.tensor([MAGIC, -7, 0]), torch.tensor([MAGIC, HUGE, 0]),  # window headers
        torch.tensor([0, 2, 1 << 23, 1 << 23, 0, 0, 0, 0, 0, 0]), torch.tensor([99, 1, 4, 0, 0, 0, 0, 0, 0, 0]),
        torch.tensor([0, 1, -4, 0, 0, 0, 0, 0, 0, 0]),  # activation shapes
    ]
    if dist.get_rank() == 0:
        for message in forged:
            dist.send(message, 1)
        garbage = b"\x80\x04not a tensor tree" * 10  # a pickle protocol header, then junk
        transfer.send_bytes(garbage, 1, what="replica state")
        dist.barrier()
        return []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    receives = [lambda: transfer.recv_bytes(0, timeout_s=30, what="upstream logs")] * 2
    receives += [lambda: recv_image(0)] * 3
    receives += [lambda: StageLinks(prev_rank=0, next_rank=None, timeout_s=30, device=torch.device("cpu"))
                 .recv_activation(what="activation")] * 3
    receives += [lambda: transfer.recv_state(0, timeout_s=30)]
    errors = []
    for receive in receives:
        try:
            receive()
            errors.append("no error")
        except PeerFailure as error:
            errors.append(f"PeerFailure: {error}")
        except Exception as error:  # noqa: BLE001 - the test reports what escaped
            errors.append(f"{type(error).__name__}: {error}")
    dist.barrier()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return errors + [f"peak RSS grew {grown_mib:.0f} MiB"]


@pytest.mark.slow
def test_sizes_read_from_the_wire_are_bounded_and_a_forged_one_is_a_peer_failure_naming_the_sender():
    from moetion.launcher import run_workers

    _, results = run_workers(_forge_or_receive, nproc=2, timeout_s=180)
    *errors, growth = results
    assert len(errors) == 9
    for error in errors:
        assert error.startswith("PeerFailure: ") and "rank 0" in error, errors
    assert "35184372088832 bytes" in errors[0] and "-5 bytes" in errors[1]
    assert "pickle" not in errors[8] and "replica state from rank 0" in errors[8]
    assert float(growth.split()[3]) < 256, growth  # nothing was allocated for the claimed sizes


# ----------------------------------------------------------------------- upstream-log memory

def _import_peak_mib(data: bytes) -> float:
    """The most memory (MiB) allocated at once while importing ``data`` (numpy buffers included)."""
    import tracemalloc

    from logging_store import LogStore

    with LogStore(workers=0) as store:
        tracemalloc.start()
        try:
            store.import_(data)
            return tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()


def test_the_log_importer_neither_trusts_a_frames_claimed_size_nor_copies_a_transfer():
    """A frame of under 16 KiB (zeros) claims 64 MiB: verifying it must not allocate that. A 16 MiB
    uncompressed transfer must not be held twice. (Before this change, importing them allocated
    64 and 32 MiB at their peak.)"""
    import logging_store as ls

    tag = ls.LogKey(0, 0, "activation", 1).to_tag()
    bomb = ls.encode(torch.zeros(16 << 20, dtype=torch.float32), codec="zstd", tag=tag)
    assert len(bomb) < 16 << 10
    assert _import_peak_mib(bomb) < 4
    plain = ls.encode(torch.randint(0, 255, (16 << 20,), dtype=torch.uint8), codec="none", tag=tag)
    assert _import_peak_mib(plain) < 4


def _train_while_the_disk_goes(root: str) -> str:
    """One rank persisting every window; after 3 iterations its run directory becomes a file."""
    import shutil

    import moetion
    from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
    from moetion.snapshot.image import SnapshotError

    model = GPTMoEConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_hidden=16, num_experts=2)
    module = moetion.PipelineModule(build_gpt_moe_layers(model), 1, loss_fn=gpt_moe_loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2), config={
        "micro_batches": 2, "snapshot": {"enabled": True, "window": 1, "shm_dir": f"{root}/shm", "run_id": "disk-goes",
                                         "persist_dir": f"{root}/disk", "replicate": False}})
    data = moetion.ByteCorpus(bytes(range(256)) * 8, seq_len=8, micro_batch_size=2)
    for _ in range(3):
        engine.train_batch(data)
    engine.checkpointer.drain(timeout_s=60)  # every window published and on disk: nothing writes while we break it
    run_dir = Path(root, "disk", "disk-goes")
    shutil.rmtree(run_dir)
    run_dir.write_text("no longer a directory")
    try:
        while engine.iteration < 60:
            engine.train_batch(data)
    except SnapshotError as error:
        return f"train_batch at iteration {engine.iteration}: {error}"
    try:
        engine.close()
    except SnapshotError as error:
        return f"close: {error}"
    return "no error"


@pytest.mark.slow
def test_a_persist_error_stops_training_at_a_following_iteration_not_only_at_close(tmp_path):
    from moetion.launcher import run_workers

    (outcome,) = run_workers(_train_while_the_disk_goes, nproc=1, args=(str(tmp_path),), timeout_s=180)
    assert outcome.startswith("train_batch at iteration ") and "cannot persist window" in outcome, outcome


def test_upstream_logs_have_a_host_memory_budget_by_default_and_spill_privately(tmp_path):
    import logging_store as ls

    from moetion.config import UpstreamLogConfig
    from moetion.memory_budget import LOG_MEMORY_FRACTION, available_bytes
    from moetion.upstream_log import store_config

    config = store_config(UpstreamLogConfig(enabled=True), local_ranks=4)
    assert config.budget_bytes is not None
    assert 0 < config.budget_bytes <= available_bytes() * LOG_MEMORY_FRACTION / 4 * 1.5  # memory moves a little
    assert store_config(UpstreamLogConfig(budget_bytes=123), local_ranks=4).budget_bytes == 123
    with ls.LogStore(config, budget_bytes=0, spill_dir=tmp_path) as store:
        store.put(ls.LogKey(0, 0, "activation", 1), torch.ones(1000))
        (spill,) = tmp_path.iterdir()
        assert spill.stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------------- no pickle

def test_replica_state_travels_as_a_tensor_tree_bit_exact_and_pickle_is_refused():
    import pickle

    from moetion.tensor_tree import TreeFormatError, decode, encode

    model = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "history": {7: torch.tensor([1.0, math.nan], dtype=torch.float64)}, "logs": (b"\x00\xff", b"")}
    data = encode(state)
    back = decode(bytearray(data), source="state")
    for name, tensor in state["model"].items():
        assert torch.equal(back["model"][name], tensor)
    for index, entries in state["optimizer"]["state"].items():
        for key, tensor in entries.items():
            assert torch.equal(back["optimizer"]["state"][index][key], tensor), key
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"] and back["logs"] == state["logs"]
    assert torch.equal(back["history"][7].view(torch.int64), state["history"][7].view(torch.int64))
    flipped = bytearray(data)
    flipped[data.index(state["history"][7].numpy().tobytes())] ^= 1  # a bit of a tensor in the blob
    for bad, message in ((pickle.dumps(state["history"]), "not a tensor tree"), (data[: len(data) - 100], "outside a blob"),
                         (data[: len(data) // 2], "manifest of"),
                         (bytes(flipped), "checksum mismatch"), (data[:12], "shorter than")):
        with pytest.raises(TreeFormatError, match=message):
            decode(bad, source="state")


@pytest.mark.parametrize("cut", [0.0, 0.3, 0.8, 1.0])
def test_a_truncated_export_is_an_export_error_never_a_struct_error(tmp_path, cut):
    """The file cut short (``cut`` 0), or its pickled index ``data.pkl`` cut short inside an intact
    zip: before, the latter leaked ``struct.error`` and ``EOFError`` from the unpickler."""
    import zipfile

    from moetion.export import ExportError, tensor_checksum, verify_export

    model = {"w": torch.arange(64, dtype=torch.float32)}
    path = tmp_path / "dense.pt"
    torch.save({"model": model, "checksums": {"w": tensor_checksum(model["w"])}, "iteration": 3}, path)
    assert verify_export(path) == 1
    if cut == 0.0:
        path.write_bytes(path.read_bytes()[:100])
    else:
        with zipfile.ZipFile(path) as archive:
            records = {name: archive.read(name) for name in archive.namelist()}
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in records.items():
                archive.writestr(name, data[: int(len(data) * cut)] if name.endswith("data.pkl") else data)
    if cut == 1.0:
        assert verify_export(path) == 1  # the rewritten zip itself is readable: the cut is what fails
        return
    with pytest.raises(ExportError, match="not a readable moetion export"):
        verify_export(path)
