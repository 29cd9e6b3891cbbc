"""Runs a job fault-free and with kill specs, under the recovering supervisor, and compares them.

Usable from pytest (:class:`FaultHarness`) and as ``moetion faults``. The job is the built-in
GPT-MoE demo (:class:`~moetion.demo.DemoSettings`) or any training script that drives a moetion
engine and closes it; each rank leaves its final state (``MOETION_HARNESS_OUT``) for the bitwise
comparison. Each run gets a run id of its own, so no run reads another's shared-memory windows.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moetion.demo import SHM_ROOT, DemoSettings, rank_main
from moetion.errors import ConfigError, MoetionError
from moetion import env as variables
from moetion.faults import PHASE_RULES, KillSpec, read_fault_log
from moetion.harness.final_state import Verdict, compare_runs, load_final_states
from moetion.harness.timeline import Timeline, timeline
from moetion.launcher import launch_script, supervise_workers
from moetion.progress import Progress
from moetion.supervisor import JobReport


@dataclass
class Job:
    """The built-in model (``demo``) or ``script`` run as ``nproc`` ranks."""

    demo: DemoSettings | None = None
    script: str | None = None
    script_args: Sequence[str] = ()
    nproc: int | None = None

    def __post_init__(self) -> None:
        if (self.demo is None) == (self.script is None):
            raise ConfigError("a harness job is either the built-in model (demo=...) or a script (script=...)")
        if self.script is not None and not self.nproc:
            raise ConfigError("a script job needs --nproc")

    @property
    def world_size(self) -> int:
        return self.demo.stages * self.demo.data_parallel if self.demo is not None else self.nproc

    def check_kills(self, kills: Sequence[KillSpec]) -> None:
        """Raises ConfigError for a kill that cannot match this job, before any process starts.

        A script's stages and iterations are unknown here; its kills are checked after the run
        (every kill must have fired).
        """
        demo = self.demo
        for kill in kills:
            if demo is None:
                kill.check_against(stages=None, replicas=None, iterations=None)
                continue
            kill.check_against(stages=demo.stages, replicas=demo.data_parallel, iterations=demo.iterations)
            if not demo.snapshots:
                raise ConfigError(f"kill spec {kill.to_text()!r}: recovering from a failure needs sparse "
                                  "snapshots; drop --no-snapshots or the kill")
            if kill.phase == "persistence" and not demo.persist_dir:
                raise ConfigError(f"kill spec {kill.to_text()!r}: phase=persistence never fires without --persist-dir")
            if kill.phase == "replication" and demo.stages * demo.data_parallel < 2:
                raise ConfigError(f"kill spec {kill.to_text()!r}: phase=replication needs a peer (2 or more ranks)")


class KillNeverFired(MoetionError):
    """A kill spec of a harness run never matched: the run tested nothing for it."""


@dataclass
class HarnessReport:
    kills: list[KillSpec]
    verdict: Verdict
    timelines: list[Timeline]
    reference_s: float
    faulty_s: float
    recoveries: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"kills: {'; '.join(k.to_text() for k in self.kills) or 'none'}"]
        for t in self.timelines:
            out += t.lines()
        out.append(f"fault-free run {self.reference_s:.1f} s, faulty run {self.faulty_s:.1f} s")
        out.append(self.verdict.summary())
        out += [f"  {m}" for m in self.verdict.mismatches[:20]]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kills": [k.to_text() for k in self.kills], "identical": self.verdict.identical,
                "mismatches": self.verdict.mismatches, "timelines": [t.to_dict() for t in self.timelines],
                "reference_s": self.reference_s, "faulty_s": self.faulty_s, "recoveries": self.recoveries}


class FaultHarness:
    """Runs ``job``'s fault-free reference once and any number of faulty runs against it."""

    def __init__(self, job: Job, *, work_dir: Path | None = None, timeout_s: float = 600.0,
                 heartbeat_timeout_s: float = 30.0, spares: int = 1, env: dict[str, str] | None = None,
                 max_restarts: int = 8) -> None:
        self.job, self.timeout_s, self.heartbeat_timeout_s = job, timeout_s, heartbeat_timeout_s
        self.spares = spares  # warm spare interpreters of a script job (see moetion.spare)
        self.env = dict(env or {})  # added to every rank's environment
        self.max_restarts = max_restarts
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="moetion-faults-"))
        self._reference: tuple[dict, float] | None = None
        self._runs = 0

    def reference(self) -> tuple[dict[int, dict[str, Any]], float]:
        if self._reference is None:
            states, _, seconds = self._run([])
            self._reference = (states, seconds)
        return self._reference

    def __enter__(self) -> "FaultHarness":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Removes the harness's work directory (final states, fault logs)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def run(self, kills: Sequence[KillSpec | str]) -> HarnessReport:
        """Runs the job with ``kills``; raises :class:`KillNeverFired` if any of them never matched."""
        specs = [k if isinstance(k, KillSpec) else KillSpec.parse(k) for k in kills]
        self.job.check_kills(specs)
        reference, reference_s = self.reference()
        states, report, seconds = self._run(specs)
        fired = {record.spec for record in read_fault_log(self.work_dir / f"run-{self._runs}" / "kills.jsonl")}
        missed = [k for k in specs if k.to_text() not in fired]
        if missed:
            raise KillNeverFired(
                "; ".join(f"kill {k.to_text()!r} never fired ({k.phase} fires {PHASE_RULES[k.phase]})" for k in missed)
                + "; the run tested nothing for it: aim it at an iteration where its phase happens")
        return HarnessReport(
            kills=specs, verdict=compare_runs(reference, states),
            timelines=[timeline(r) for r in report.recoveries], reference_s=reference_s, faulty_s=seconds,
            recoveries=[r.to_dict() for r in report.recoveries],
        )

    def _run(self, kills: list[KillSpec]) -> tuple[dict[int, dict[str, Any]], JobReport, float]:
        self._runs += 1
        run = self.work_dir / f"run-{self._runs}"
        out = run / "final"
        out.mkdir(parents=True)
        run_id = f"faults-{os.getpid()}-{self._runs}-{secrets.token_hex(4)}"
        env = {**self.env, variables.HARNESS_OUT: str(out), variables.FAULT_LOG: str(run / "kills.jsonl"),
               variables.RUN_ID: run_id}
        if kills:
            env[variables.KILLS] = ";".join(k.to_text() for k in kills)
        start = time.perf_counter()
        try:
            if self.job.demo is not None:
                report = supervise_workers(rank_main, nproc=self.job.world_size, args=(self.job.demo, run_id),
                                           recover=True, env=env, timeout_s=self.timeout_s,
                                           heartbeat_timeout_s=self.heartbeat_timeout_s, max_restarts=self.max_restarts)
            else:
                report = launch_script(self.job.script, list(self.job.script_args), nproc=self.job.world_size,
                                       recover=True, env=env, timeout_s=self.timeout_s,
                                       heartbeat_timeout_s=self.heartbeat_timeout_s,
                                       spares=self.spares if kills else 0,  # nothing to replace in a fault-free run
                                       max_restarts=self.max_restarts)
        finally:
            shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)
        return load_final_states(out), report, time.perf_counter() - start


def faults_command(settings: DemoSettings, *, kills: list[str], script: str | None, nproc: int | None,
                   script_args: list[str], timeout_s: float, heartbeat_timeout_s: float,
                   json_out: str | None, spares: int = 1, quiet: bool = False) -> int:
    """``moetion faults``: prints the report; exit status 0 only when the runs are bit-identical."""
    import json

    job = Job(script=script, script_args=script_args, nproc=nproc) if script else Job(demo=settings)
    if job.demo is not None:
        job.demo.progress = False
    specs = [KillSpec.parse(k) for k in kills]
    job.check_kills(specs)
    second = f"the same run with {len(specs)} kill(s)" if specs else "a second fault-free run (is the job deterministic at all?)"
    print(f"moetion faults: fault-free reference run, then {second}", flush=True)
    with FaultHarness(job, timeout_s=timeout_s, heartbeat_timeout_s=heartbeat_timeout_s, spares=spares) as harness:
        with Progress(total=2, desc="faults: runs (fault-free, then faulty)", quiet=quiet) as bar:
            harness.reference()
            bar.update()
            report = harness.run(specs)
            bar.update()
    print("\n".join(report.lines()), flush=True)
    if json_out:
        Path(json_out).write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.verdict.identical else 2
