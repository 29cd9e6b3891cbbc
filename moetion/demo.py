"""``moetion demo``: the built-in GPT-MoE model trained across pipeline-stage processes on CPU."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import moetion
from moetion import env
from moetion.config import DEFAULT_SHM_DIR
from moetion.data import ByteCorpus, stdlib_corpus
from moetion.errors import ConfigError
from moetion.export import JobSpec
from moetion.launcher import run_workers
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.report import write_report


SHM_ROOT = DEFAULT_SHM_DIR


@dataclass
class DemoSettings:
    iterations: int = 50
    stages: int = 4
    data_parallel: int = 1
    expert_parallel: int = 1  # ep_size: each stage's experts split over this many of its replicas
    micro_batches: int = 4
    micro_batch_size: int = 8
    precision: str = "fp32"
    lr: float = 3e-3
    seed: int = 0
    snapshots: bool = True
    window: int | None = None
    persist_dir: str | None = None
    persist_codec: str = "none"  # snapshot.persist_codec: "lz4"/"zstd" write windows delta-compressed
    replicate: bool = True
    progress: bool = True  # rank 0 prints a line per iteration
    run_dir: str | None = None  # metrics go to run_dir/metrics, `moetion report`'s output to run_dir/report
    peer_timeout_s: float = 300.0  # the last-resort bound of every wait (see moetion.timeouts)
    strict: bool = False  # determinism.strict: refuse ops without a deterministic implementation (use on CUDA)

    def check(self) -> None:
        """Raises ConfigError (naming the command-line flag) for settings no run can start with;
        called before any process is forked."""
        for flag, value in (("--iterations", self.iterations), ("--stages", self.stages),
                            ("--data-parallel", self.data_parallel), ("--expert-parallel", self.expert_parallel),
                            ("--micro-batches", self.micro_batches)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.window is not None and (type(self.window) is not int or self.window < 1):
            raise ConfigError(f"--window must be an integer >= 1, got {self.window!r}")
        if self.data_parallel % self.expert_parallel:
            raise ConfigError(f"--expert-parallel {self.expert_parallel} must divide --data-parallel {self.data_parallel}")
        if demo_model_config().num_experts % self.expert_parallel:
            raise ConfigError(f"--expert-parallel {self.expert_parallel} must divide the demo model's "
                              f"{demo_model_config().num_experts} experts")
        layers = len(build_gpt_moe_layers(demo_model_config()))
        if self.stages > layers:
            raise ConfigError(f"--stages {self.stages}: the demo model has {layers} layers and every stage needs "
                              f"at least one; use --stages 1..{layers}")


def demo_model_config() -> GPTMoEConfig:
    return GPTMoEConfig(seq_len=64, d_model=64, n_heads=4, n_layers=6, d_hidden=128, num_experts=4, top_k=2)


def demo_engine_config(settings: DemoSettings, *, run_id: str = "demo") -> moetion.Config:
    return moetion.Config.from_dict({
        "seed": settings.seed,
        "micro_batches": settings.micro_batches,
        "precision": settings.precision,
        "grad_clip": 1.0,
        "lr_schedule": {"warmup_iterations": 5, "decay": "cosine",
                        "decay_iterations": max(1, settings.iterations - 5), "min_ratio": 0.1},
        "snapshot": {"enabled": settings.snapshots, "window": settings.window, "run_id": run_id,
                     "shm_dir": SHM_ROOT, "persist_dir": settings.persist_dir,
                     "persist_codec": settings.persist_codec, "replicate": settings.replicate},
        "upstream_log": {"enabled": settings.snapshots},
        "peer_timeout_s": settings.peer_timeout_s,
        "determinism": {"strict": settings.strict},
        "metrics": {"dir": settings.run_dir},
    })


def job(settings: DemoSettings | None = None) -> JobSpec:
    """The demo's model, optimizer and data for ``moetion export --job moetion.demo:job``."""
    settings = settings or DemoSettings()
    model = demo_model_config()
    return JobSpec(
        layers=build_gpt_moe_layers(model), num_stages=settings.stages, loss_fn=gpt_moe_loss,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=settings.lr),
        data=ByteCorpus(stdlib_corpus(), seq_len=model.seq_len, micro_batch_size=settings.micro_batch_size, seed=settings.seed),
        module_seed=settings.seed,
    )


def run_demo(settings: DemoSettings, kills: list[str] | None = None) -> dict:
    """Trains the demo and returns its summary (also printed by rank 0).

    With ``kills`` (kill specs, see :mod:`moetion.faults`), the demo runs under the fault harness:
    a fault-free reference first, then the same training with each kill a real SIGKILL, recovered
    in place; it prints every recovery's timeline and whether the two runs are bit-identical.
    """
    settings.check()
    print(
        f"moetion demo: GPT-MoE ({demo_model_config().n_layers} MoE blocks x {demo_model_config().num_experts} "
        f"experts) on {settings.stages} stages x {settings.data_parallel} replicas"
        f"{f' (experts split over {settings.expert_parallel})' if settings.expert_parallel > 1 else ''}, "
        f"{settings.micro_batches} micro-batches, {settings.iterations} iterations, {settings.precision}",
        flush=True,
    )
    os.environ.setdefault(env.LOG_LEVEL, "WARNING")  # progress lines only; INFO shows every rank's events
    if kills:
        summary = _run_with_faults(settings, kills)
    else:
        run_id = f"demo-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            summary = run_workers(rank_main, nproc=settings.stages * settings.data_parallel, args=(settings, run_id))[0]
        finally:
            shutil.rmtree(Path(SHM_ROOT) / run_id, ignore_errors=True)  # the demo's windows die with it
    if settings.run_dir is not None:
        report = write_report(settings.run_dir)
        print("\n".join(["", f"report of this run ({settings.run_dir}):"] + ["  " + line for line in report.lines()]),
              flush=True)
    return summary


def _run_with_faults(settings: DemoSettings, kills: list[str]) -> dict:
    from moetion.faults import KillSpec
    from moetion.harness.runner import FaultHarness, Job

    job = Job(demo=settings)
    specs = [KillSpec.parse(k) for k in kills]
    job.check_kills(specs)
    print(f"fault-free reference run first (quiet), then the same run with: {'; '.join(kills)}", flush=True)
    with FaultHarness(job) as harness:
        with _reference_settings(settings):
            harness.reference()
        report = harness.run(specs)
    print("\n".join(["", "recovery:"] + ["  " + line for line in report.lines()]), flush=True)
    return report.to_dict()


@contextlib.contextmanager
def _reference_settings(settings: DemoSettings):
    """The fault-free reference run prints no progress and writes no metrics (the report is the faulty run's)."""
    progress, run_dir = settings.progress, settings.run_dir
    settings.progress, settings.run_dir = False, None
    try:
        yield
    finally:
        settings.progress, settings.run_dir = progress, run_dir


def rank_main(settings: DemoSettings, run_id: str) -> dict:
    """One rank of the demo (also the fault harness's built-in job)."""
    model = demo_model_config()
    module = moetion.PipelineModule(build_gpt_moe_layers(model), settings.stages, loss_fn=gpt_moe_loss, seed=settings.seed,
                                    ep_size=settings.expert_parallel)
    engine = moetion.initialize(
        module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=settings.lr),
        config=demo_engine_config(settings, run_id=run_id),
    )
    data = ByteCorpus(stdlib_corpus(), seq_len=model.seq_len, micro_batch_size=settings.micro_batch_size, seed=settings.seed)
    tokens_per_iteration = settings.micro_batches * settings.data_parallel * settings.micro_batch_size * model.seq_len
    speaker = engine.dist.rank == 0 and settings.progress
    start = time.perf_counter()
    seconds = []
    while engine.iteration < settings.iterations:  # a replacement joins mid-run: count from the engine
        loss = engine.train_batch(data)
        stats = engine.last_stats
        seconds.append(stats.seconds)
        if speaker:
            print(
                f"iter {stats.iteration + 1:4d}/{settings.iterations}  loss {loss:7.4f}  "
                f"grad-norm {stats.grad_norm:6.3f}  lr x{stats.lr_factor:5.3f}  "
                f"{tokens_per_iteration / stats.seconds:8.0f} tokens/s  {stats.seconds * 1000:6.1f} ms",
                flush=True,
            )
    log_bytes = engine.upstream.bytes_per_iteration() if engine.upstream is not None else None
    engine.close()
    total = time.perf_counter() - start
    timed = sorted(seconds[1:] or seconds) or [float("nan")]  # a replacement may join after the last iteration
    steady = timed[len(timed) // 2]
    summary = {
        "iterations": settings.iterations,
        "final_loss": loss,
        "wall_s": total,
        "median_iteration_s": steady,
        "tokens_per_s": tokens_per_iteration / steady,
        "threads_per_rank": engine.threads,
    }
    if engine.checkpointer is not None:
        summary["snapshots"] = _snapshot_summary(engine, log_bytes)
    if speaker:
        if "snapshots" in summary:
            print(summary["snapshots"]["line"], flush=True)
        print(
            f"done: {settings.iterations} iterations in {total:.1f} s, median {steady * 1000:.0f} ms/iteration, "
            f"{summary['tokens_per_s']:.0f} tokens/s, final loss {loss:.4f}, {engine.threads} thread(s) per rank",
            flush=True,
        )
    return summary


def _snapshot_summary(engine: moetion.PipelineEngine, log_bytes: tuple[float, float] | None) -> dict:
    ckpt = engine.checkpointer
    last = ckpt.last_complete
    tiers = ckpt.tier_bytes()
    window = f"latest complete window {last.start_iteration}..{last.end_iteration} (W={last.window})" if last else "no complete window yet"
    raw, stored = log_bytes or (0.0, 0.0)
    line = (
        f"sparse checkpoints (stage {engine.stage}): {ckpt.windows_completed} windows complete, {window}, "
        + ", ".join(f"{tier} {size / 1024:.0f} KiB" for tier, size in tiers.items())
        + f"; upstream log {raw / 1024:.0f} KiB/iteration raw, {stored / 1024:.0f} KiB stored"
    )
    return {"windows": ckpt.windows_completed, "window": last.window if last else None, "tiers": tiers,
            "log_bytes_per_iteration": {"raw": raw, "stored": stored}, "line": line}
