"""Bad input, tried as a new user would: each is a one-line error naming the key or flag, never a
traceback, and leaves nothing behind. The CLI rows run the real ``moetion`` command in a subprocess;
all of them fail before any rank starts, so they are fast."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    assert not list(private_tmp.iterdir()), "the command left files behind"


def test_cli_errors_come_before_any_process_and_print_no_traceback(tmp_path):
    """The real command, once end to end: the kill is refused before the reference run starts."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "moetion.cli", "demo", "--kill", "stage=9,iter=5,phase=forward"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == ["moetion demo: error: --kill: kill spec 'stage=9,iter=5,phase=forward,replica=0': "
                                        "stage=9 is outside this job's stages (0..3)"]
    assert "reference" not in done.stdout and not list(tmp_path.iterdir())


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


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("moetion"))


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
    assert "Traceback" not in done.stderr and "BIT-IDENTICAL" not in done.stdout
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
