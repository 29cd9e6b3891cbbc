"""The fault matrix, folded: several kills per run (first/middle/last stage x forward/backward/step),
one run per topology and model kind. Every run must end bit-identical to the fault-free run, and
every survivor must have abandoned its wait because of the failure notice, never a timeout:
``peer_timeout_s`` is far above the run's length, so a survivor that waited for it would show. The
one exception allowed is the documented gloo gap (docs/timeouts-and-spares.md): a send partly
written when its peer died is never told, and its wait ends at ``peer_timeout_s`` (or the
supervisor's rejoin timeout) with gloo's "for send operation to complete"; the run must still end
bit-identical.
One rank of each run is never killed: a loss committed before every rank had been replaced would
otherwise be reported by no rank. The per-cell matrix with timings is
``experiments/bench_recovery.py --matrix``."""
import re

import pytest

from moetion.demo import DemoSettings
from moetion.harness.runner import FaultHarness, Job

from recovering_script import recovering_script

PEER_TIMEOUT_S = 150.0  # far above any run here, and short enough for a stranded gloo send to end within the test
JOB_TIMEOUT_S = 400.0  # above peer_timeout_s, as the timeout hierarchy requires
STRANDED_SEND = "for send operation to complete"  # gloo's timeout of a send whose closed pair never told it


def survivor_causes(report) -> list[tuple[int, int, str]]:
    """(generation it rejoined, rank, cause) of every survivor that abandoned an in-flight iteration."""
    return [(r["generation"], rank, events["cause"])
            for r in report.recoveries for rank, events in r["rank_events"].items()
            if events.get("role") == "survivor" and events.get("cause") != "finished; a rank was lost"]


def assert_bit_identical_and_noticed(report, *, recoveries: int):
    assert report.verdict.identical, "\n".join(report.lines())
    restored = [t for t in report.timelines if not t.superseded]
    assert len(restored) >= recoveries, "\n".join(report.lines())
    causes = survivor_causes(report)
    assert len(causes) >= recoveries, causes
    for generation, rank, cause in causes:
        noticed = re.match(r"generation (\d+) published \(rank \d+ killed by SIG", cause)
        assert noticed and int(noticed.group(1)) <= generation, (generation, rank, cause)
        if "no answer within" in cause or "Timed out" in cause:  # only a send may be stranded (gloo's gap)
            assert STRANDED_SEND in cause or " while sending " in cause, cause
    retries = [retry for r in report.recoveries for e in r["rank_events"].values() for retry in e.get("retries", [])]
    assert not any("no answer within" in retry for retry in retries), retries


def demo(**values) -> DemoSettings:
    return DemoSettings(**{"iterations": 20, "window": 2, "micro_batches": 2, "micro_batch_size": 2, "progress": False, "lr": 1e-2,
                           "peer_timeout_s": PEER_TIMEOUT_S, **values})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_four_stages_first_middle_last_at_forward_backward_step(tmp_path):
    kills = ["stage=0,iter=2,phase=forward", "stage=1,iter=4,phase=backward", "stage=3,iter=6,phase=step",
             "stage=3,iter=8,phase=forward", "stage=0,iter=10,phase=backward", "stage=1,iter=12,phase=step",
             "stage=1,iter=14,phase=forward", "stage=3,iter=16,phase=backward", "stage=0,iter=18,phase=step"]
    harness = FaultHarness(Job(demo=demo(stages=4)), work_dir=tmp_path, timeout_s=JOB_TIMEOUT_S,
                           max_restarts=len(kills))
    assert_bit_identical_and_noticed(harness.run(kills), recoveries=len(kills))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_stages_by_two_replicas(tmp_path):
    kills = ["stage=0,iter=3,phase=forward", "stage=1,iter=6,phase=backward,replica=1", "stage=0,iter=9,phase=step,replica=1"]
    harness = FaultHarness(Job(demo=demo(stages=2, data_parallel=2, iterations=12)), work_dir=tmp_path,
                           timeout_s=JOB_TIMEOUT_S)
    assert_bit_identical_and_noticed(harness.run(kills), recoveries=len(kills))


KILL_IDLE_SPARES = '''
import os, signal, time
from pathlib import Path
def idle_spares():
    found = []
    for pid in os.listdir("/proc"):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")
        except (OSError, ValueError):
            continue
        if name == "moetion-spare" and os.path.abspath(__file__).encode() in cmdline:
            found.append(int(pid))
    return found
def kill_idle_spares(marker):
    """Once per faulty run, SIGKILLs this job's idle warm spare(s) (named moetion-spare, for this
    script), waiting for one to be idle first (a spare names itself once it has imported moetion).
    The fault-free reference run has no spares (and no armed kills): nothing to wait for there."""
    if Path(marker).exists() or not os.environ.get("MOETION_KILL"):
        return
    Path(marker).touch()
    deadline = time.monotonic() + 300
    while not idle_spares() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in idle_spares():
        os.kill(pid, signal.SIGKILL)
'''


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_script_with_warm_spares_through_two_deaths_at_once_a_spare_killed_idle_and_a_death_in_handover(tmp_path):
    """3 stages, a user script, one warm spare. Iteration 2: stages 0 and 1 die in the same optimizer
    step (two deaths within the same second: one generation or two; a spare and a fresh interpreter).
    Iteration 5: stage 0 dies in backward and its replacement, a spare just handed its identity,
    dies in its replay. After iteration 7 the script SIGKILLs the idle spare: stage 1's death at
    iteration 9 (step) must still recover, from a fresh interpreter. Stage 2 lives throughout."""
    script = tmp_path / "train.py"
    body = recovering_script(stages=3, iterations=11).replace(
        '"micro_batches": 2,', f'"micro_batches": 3, "peer_timeout_s": {PEER_TIMEOUT_S},').replace(
        "    engine.train_batch(data)\n",
        "    engine.train_batch(data)\n"
        "    if engine.iteration == 8 and engine.dist.rank == 1:\n"
        "        kill_idle_spares(os.environ['MOETION_FAULT_LOG'] + '.spares-killed')\n")  # once per run
    script.write_text(KILL_IDLE_SPARES + body)
    kills = ["stage=0,iter=2,phase=step", "stage=1,iter=2,phase=step", "stage=0,iter=5,phase=backward",
             "stage=0,iter=4,phase=replay", "stage=1,iter=9,phase=step"]
    harness = FaultHarness(Job(script=str(script), script_args=[str(tmp_path / "shm")], nproc=3), work_dir=tmp_path,
                           timeout_s=JOB_TIMEOUT_S, spares=1)
    report = harness.run(kills)
    assert_bit_identical_and_noticed(report, recoveries=3)
    kinds = [kind for r in report.recoveries for kind in r["kinds"].values()]
    assert "spare" in kinds, kinds
    last = report.recoveries[-1]
    assert last["ranks"] == [1] and last["kinds"] == {1: "fresh"}, last
