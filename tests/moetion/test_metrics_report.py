"""Per-rank metrics and `moetion report`: one short recovering run, checked several ways.

The run: the built-in model on 3 stages for 10 iterations, stage 1 SIGKILLed mid-backward in
iteration 5 and recovered (a real supervisor, real gloo groups). Every metrics line must parse
against the schema; the summary's figures are recomputed here from the raw JSON, independently
of moetion.report.summary.
"""
import io
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from moetion.cli import main
from moetion.demo import SHM_ROOT, DemoSettings, rank_main
from moetion.errors import ConfigError
from moetion.env import KILLS as KILL_ENV
from moetion.launcher import supervise_workers
from moetion.metrics import (IterationRecord, MetricsError, RecoveryRecord, WindowRecord, metrics_path, parse_record,
                             read_run, to_line)
from moetion.progress import Progress, track
from moetion.report import NO_MATPLOTLIB, write_report
from moetion.report.summary import summarize

ITERATIONS, STAGES, KILLED = 10, 3, 1
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    settings = DemoSettings(iterations=ITERATIONS, stages=STAGES, window=2, progress=False, run_dir=str(run_dir),
                            micro_batch_size=2, micro_batches=2)
    run_id = f"metrics-test-{os.getpid()}"
    env = {KILL_ENV: f"stage={KILLED},iter=5,phase=backward", "MOETION_RUN_ID": run_id}
    try:
        report = supervise_workers(rank_main, nproc=STAGES, args=(settings, run_id), recover=True, env=env,
                                   timeout_s=400)
    finally:
        shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
    assert len(report.recoveries) == 1
    return run_dir


def raw_lines(run_dir):
    return {rank: [json.loads(line) for line in metrics_path(run_dir, rank).read_text().splitlines()]
            for rank in range(STAGES)}


@pytest.mark.slow
def test_every_line_matches_the_schema_and_every_iteration_is_recorded_once_per_rank(run_dir):
    runs = read_run(run_dir)  # parse_record on every line: raises on any key or type mismatch
    assert sorted(runs) == list(range(STAGES))
    for rank, records in runs.items():
        iterations = [r.iteration for r in records if isinstance(r, IterationRecord)]
        assert iterations == list(range(ITERATIONS)), rank
        windows = [r for r in records if isinstance(r, WindowRecord)]
        assert {w.event for w in windows} == {"started", "completed"}
        assert all(w.window == 2 for w in windows)
        assert all(w.bytes > 0 for w in windows if w.event == "completed")
    losses = {r.iteration: r.loss for rs in runs.values() for r in rs if isinstance(r, IterationRecord)}
    assert all(r.loss == losses[r.iteration] for rs in runs.values() for r in rs if isinstance(r, IterationRecord))


@pytest.mark.slow
def test_the_recovery_writes_every_ranks_events(run_dir):
    runs = read_run(run_dir)
    recoveries = {rank: [r for r in records if isinstance(r, RecoveryRecord)] for rank, records in runs.items()}
    assert all(len(rs) == 1 and rs[0].generation == 1 for rs in recoveries.values())
    replacement = recoveries[KILLED][0]
    assert replacement.role == "replacement" and replacement.source == "shm" and replacement.resume == 5
    assert replacement.joined_at <= replacement.state_loaded_at <= replacement.ready_at <= replacement.resumed_at
    for rank in set(range(STAGES)) - {KILLED}:
        survivor = recoveries[rank][0]
        assert survivor.role == "survivor" and survivor.iteration == 5 and survivor.detected_at <= survivor.resumed_at


@pytest.mark.slow
def test_report_writes_the_plots_and_a_summary_equal_to_the_metrics(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    report = write_report(run_dir, out)
    names = sorted(p.name for p in report.plots)
    assert names == ["host_memory.png", "iteration_time.png", "loss.png", "recovery-gen1.png"]
    for path in report.plots:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 1000, path
    lines = raw_lines(run_dir)
    its = [x for rs in lines.values() for x in rs if x["kind"] == "iteration"]
    recs = [x for rs in lines.values() for x in rs if x["kind"] == "recovery"]
    s = report.summary
    assert s.iterations == ITERATIONS == len({x["iteration"] for x in its})
    assert s.ranks == STAGES
    assert s.final_loss == next(x["loss"] for x in its if x["iteration"] == ITERATIONS - 1)
    assert s.median_iteration_ms == statistics.median(x["iteration_ms"] for x in its)
    total = sum(x["iteration_ms"] for x in its)
    assert s.capture_share == sum(x["capture_ms"] for x in its) / total
    assert s.logging_share == sum(x["logging_ms"] for x in its) / total
    assert s.peak_log_host_bytes == max(x["log_host_bytes"] for x in its)
    lost = (max(x["resumed_at"] for x in recs) - min(x["detected_at"] for x in recs if x["role"] == "survivor")
            + max(x["inflight_s"] for x in recs if x["role"] == "survivor"))
    (failure,) = s.failures
    assert failure.lost_s == pytest.approx(lost, abs=1e-9) and failure.abandoned_iteration == 5
    assert failure.replaced_ranks == [KILLED]
    text = (out / "summary.txt").read_text()
    assert f"{ITERATIONS} iterations on {STAGES} rank(s)" in text and "1 failure(s)" in text


@pytest.mark.slow
def test_report_cli_prints_the_summary_and_no_progress_when_not_a_tty(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert f"{ITERATIONS} iterations on {STAGES} rank(s)" in printed.out and printed.err == ""


def test_a_line_off_the_schema_is_rejected_with_what_differs():
    good = IterationRecord(rank=0, stage=0, replica=0, generation=0, time=1.0, iteration=3, loss=2.0, grad_norm=1.0,
                           clip_coef=1.0, lr_factor=1.0, iteration_ms=10.0, capture_ms=0.1, logging_ms=0.2,
                           metrics_ms=0.0, snapshot_bytes=5, log_bytes=6, log_host_bytes=7, window_host_bytes=8)
    assert parse_record(to_line(good)) == good
    values = json.loads(to_line(good))
    for damage, message in [({"iteration": "3"}, "iteration should be"), ({"loss": None}, "loss should be"),
                            ({"snapshot_bytes": True}, "snapshot_bytes should be"), ({"extra": 1}, "unexpected keys"),
                            ({"kind": "weather"}, "kind in")]:
        with pytest.raises(MetricsError, match=message):
            parse_record(json.dumps({**values, **damage}))
    with pytest.raises(MetricsError, match="missing keys"):
        parse_record(json.dumps({k: v for k, v in values.items() if k != "loss"}))
    with pytest.raises(MetricsError, match="one JSON object per line"):
        parse_record("{not json")


def test_a_run_directory_without_metrics_is_a_clear_cli_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("moetion report: error: expected metrics files")


def test_without_matplotlib_the_summary_is_written_with_a_note(tmp_path, monkeypatch):
    record = RecoveryRecord(rank=0, stage=0, replica=0, generation=1, time=2.0, role="survivor", resume=4, cause="x",
                            iteration=4, inflight_s=0.5, detected_at=1.0, joined_at=1.5, restore_at=None,
                            state_loaded_at=None, logs_received_at=None, ready_at=None, resumed_at=3.0, source=None,
                            replayed=None, replay_s=None, bytes_sent=0, bytes_received=None, retries=0)
    path = metrics_path(tmp_path, 0)
    path.parent.mkdir()
    path.write_text(to_line(record))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra looks like
    report = write_report(tmp_path)
    assert report.plots == [] and report.note == NO_MATPLOTLIB
    assert NO_MATPLOTLIB in report.summary_path.read_text()
    assert summarize(read_run(tmp_path)).failures[0].lost_s == pytest.approx(2.5)


def test_metrics_config_is_typed():
    from moetion.config import Config

    with pytest.raises(ConfigError, match="metrics.dir must be"):
        Config.from_dict({"metrics": {"dir": 3}})
    with pytest.raises(ConfigError, match="metrics.tensorboard needs metrics.dir"):
        Config.from_dict({"metrics": {"tensorboard": True}})
    assert Config.from_dict({"metrics": {"dir": "runs/a"}}).metrics.dir == "runs/a"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_on_a_terminal_only_and_never_when_quiet():
    for stream, quiet, drawn in [(_Terminal(), False, True), (io.StringIO(), False, False), (_Terminal(), True, False)]:
        assert list(track(range(3), desc="work", quiet=quiet, stream=stream)) == [0, 1, 2]
        assert bool(stream.getvalue()) is drawn
    with Progress(total=2, desc="work", stream=io.StringIO()) as bar:
        bar.update(2)
    assert bar.done == 2 and not bar.enabled


def test_plan_draws_progress_on_a_terminal_and_nothing_otherwise(capsys, monkeypatch):
    plan = ["plan", "--preset", "gpt-moe", "--mtbf", "1h", "--runs", "2"]
    assert main(plan) == 0
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # the positive control: the same command on a terminal
    assert main(plan) == 0 and "plan: simulating" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main(plan + ["--quiet"]) == 0 and quiet.getvalue() == ""


def test_docs_metrics_lists_every_field_of_every_record():
    import dataclasses

    page = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    for record in (IterationRecord, WindowRecord, RecoveryRecord):
        assert f'`kind: "{record.kind}"` (`{record.__name__}`)' in page
        for f in dataclasses.fields(record):
            assert f"`{f.name}`" in page, (record.__name__, f.name)
