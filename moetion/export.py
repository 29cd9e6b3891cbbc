"""``moetion export``: an ordinary dense checkpoint from a run's persisted sparse windows.

Every stage is rebuilt on CPU by replaying its persisted window with its neighbours' persisted logs
(:func:`moetion.replay.dense_state_from_persisted`), in forked worker processes, one stage at a time
per worker. Each stage's state goes to its own temporary file beside OUT and is dropped before the
worker starts the next, so a worker holds one stage, not the model. The stage files are then merged
through memory maps into one ``torch.save`` file keyed like the unpartitioned model, written under
a temporary name and renamed onto OUT: on any error nothing appears at OUT.
"""
from __future__ import annotations

import importlib
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed.checkpoint as dcp
from logging_store import LogStore
from logging_store.errors import LogStoreError
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from moetion import env
from moetion.config import Config
from moetion.data import DataSource
from moetion import tensor_tree
from moetion.errors import MoetionError
from moetion.launcher import run_workers
from moetion.module import LayerSpec
from moetion.progress import Progress
from moetion.expert_parallel import ExpertShard
from moetion.export_replicas import gather_stage, held_experts, replay_replicas
from moetion.replay import dense_state_from_persisted
from moetion.private_files import DIR_MODE, FILE_MODE, create_exclusive, fsync_dir, private_dir, temp_name
from moetion.snapshot.image import SnapshotError, WindowManifest, checksum
from moetion.snapshot.run_dir import RUN_CONFIG, read_run_record
from moetion.snapshot.persist import LOGS, MANIFEST, iter_window_dirs, load_window_logs, read_manifest, window_path

log = logging.getLogger(__name__)

PROGRESS_JOIN_S = 5.0  # the bar's reader thread, after the workers are gone

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class ExportError(MoetionError):
    """The run directory, the job definition or the output cannot give a consistent dense checkpoint."""


@dataclass(frozen=True)
class JobSpec:
    """What the persisted windows do not hold: the model's code, its loss, optimizer, data and LR scheduler.

    It must describe the job exactly as it was trained (same layers, stage count, partitioning and
    module seed); the run's config (precision, micro-batches, seed, ...) comes from its ``config.json``.
    ``data`` is the addressable source the run read, or for a run trained on a data_iter a fresh
    loader built the same way (the window holds its position). ``lr_scheduler`` is the factory the
    run passed to :func:`moetion.initialize`, if any (its state comes from the window).
    """

    layers: Sequence[LayerSpec | nn.Module]
    num_stages: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: OptimizerFactory
    data: DataSource | Iterable
    partition_method: str = "parameters"
    module_seed: int = 0
    lr_scheduler: Callable[[torch.optim.Optimizer], LRScheduler] | None = None


def load_job(spec: str) -> JobSpec:
    """Resolves ``"package.module:function"`` and calls the function (no arguments) for the JobSpec."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ExportError(f"job {spec!r}: expected 'package.module:function', e.g. 'moetion.demo:job'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ExportError(f"job {spec!r}: cannot import {module_name}: {error}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExportError(f"job {spec!r}: {module_name} has no function {attr}")
    job = factory()
    if not isinstance(job, JobSpec):
        raise ExportError(f"job {spec!r}: {attr}() returned {type(job).__name__}, not a moetion.export.JobSpec")
    return job


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    job: JobSpec,
    iteration: int | None = None,
    with_optimizer: bool = False,
    verify: bool = False,
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
    dcp_dir: str | Path | None = None,
) -> dict:
    """Writes the dense state at the end of one persisted window to ``out``; returns a summary.

    ``iteration`` is the start of the window to export (it must be persisted by every stage;
    default: the newest such window). ``workers`` processes (default: one per core, at most one per
    stage) convert stages in parallel; ``progress`` gets one line per stage, in those processes
    (default: print to stdout). ``verify`` re-reads ``out`` and checks every tensor's checksum.
    ``dcp_dir`` also writes the model as a ``torch.distributed.checkpoint`` directory (new; atomic).
    As for :func:`moetion.launcher.run_workers`, the caller must not have run multi-threaded torch
    work (building ``job`` included) before: forked workers would wait on its OpenMP threads.
    """
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    config, nonce = read_run_config(run_dir)
    start = _pick_window(run_dir, num_stages=job.num_stages, iteration=iteration)
    manifests = _check_windows(run_dir, num_stages=job.num_stages, start=start, run_id=config.snapshot.run_id,
                               job_nonce=nonce)
    if not out.parent.is_dir():
        raise ExportError(f"{out}: its directory {out.parent} does not exist")
    if dcp_dir is not None and Path(dcp_dir).exists():
        raise ExportError(f"{dcp_dir}: already exists; choose a new directory for the DCP checkpoint")
    nproc = max(1, min(workers or os.cpu_count() or 1, job.num_stages))
    replicas = int(manifests[0].extra.get("data_parallel", 1))
    ep_size = int(manifests[0].extra.get("expert_parallel", 1))
    if replicas > 1:
        _check_replica_windows(run_dir, job=job, start=start, replicas=replicas, ep_size=ep_size)
        if with_optimizer:
            raise ExportError(f"{run_dir}: a run of {replicas} data-parallel replicas exports its weights only "
                              "(--with-optimizer is not supported for it yet)")
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".stages", dir=out.parent))
    try:
        if replicas > 1:
            reports = _convert_replicated(run_dir, job=job, config=config, start=start, stage_dir=stage_dir,
                                          replicas=replicas, ep_size=ep_size, progress=progress or _print_line)
        else:
            reports = _convert_all(run_dir, job=job, config=config, start=start, stage_dir=stage_dir, nproc=nproc,
                                   with_optimizer=with_optimizer, progress=progress or _print_line)
        dense = _merge(sorted(reports, key=lambda r: r["stage"]), run_id=manifests[0].run_id,
                       with_optimizer=with_optimizer)
        _save_atomically(dense, out)
        if dcp_dir is not None:
            _save_dcp_atomically(dense["model"], Path(dcp_dir))
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    if verify:
        verify_export(out)
    summary = {"path": str(out), "iteration": dense["iteration"], "start_iteration": start,
               "stages": job.num_stages, "tensors": len(dense["model"]), "bytes": out.stat().st_size,
               "seconds": time.perf_counter() - started, "workers": nproc}
    log.info("exported %s", summary)
    return summary


def export_command(run_dir: str, out: str, *, job: str, iteration: int | None, with_optimizer: bool, verify: bool,
                   workers: int | None, dcp_dir: str | None = None, quiet: bool = False) -> dict:
    """``moetion export``: the export plus its closing line. Progress: a bar over stages on a
    terminal, else a line per stage; nothing with ``quiet``."""
    torch.set_num_threads(1)  # building the job must not start an OpenMP pool: forked workers would hang on it
    spec = load_job(job)
    with _StageProgress(total=spec.num_stages, quiet=quiet) as stages:
        progress = stages.line if stages.bar.enabled else (lambda _: None) if quiet else None
        summary = export_run(run_dir, out, job=spec, iteration=iteration, with_optimizer=with_optimizer,
                             verify=verify, workers=workers, dcp_dir=dcp_dir, progress=progress)
    print(f"wrote {summary['path']}: iteration {summary['iteration']}, {summary['stages']} stages, "
          f"{summary['tensors']} tensors, {summary['bytes']} bytes in {summary['seconds']:.1f} s"
          + (" (verified)" if verify else ""), flush=True)
    return summary


def verify_export(path: str | Path) -> int:
    """Re-reads an exported file and checks every tensor against its recorded checksum; returns
    the number of tensors checked."""
    path = Path(path)
    try:
        dense = torch.load(path, mmap=True, weights_only=True)
        model, sums = dense["model"], dense["checksums"]
        if not isinstance(model, dict) or not isinstance(sums, dict):
            raise TypeError(f"model and checksums must be dicts, got {type(model).__name__} and {type(sums).__name__}")
    except Exception as error:  # noqa: BLE001 - a damaged zip or pickle fails in many ways (struct.error, EOFError...)
        raise ExportError(f"{path}: not a readable moetion export ({type(error).__name__}: {error}); export again") from None
    if set(model) != set(sums):
        raise ExportError(f"{path}: tensors and checksums differ: without checksum {sorted(set(model) - set(sums))}, "
                          f"checksum without tensor {sorted(set(sums) - set(model))}; export again")
    for name, tensor in model.items():
        if (found := tensor_checksum(tensor)) != sums[name]:
            raise ExportError(f"{path}: tensor {name} is corrupted (checksum {found:#x}, recorded {sums[name]:#x}); "
                              "export again")
    return len(model)


def tensor_checksum(tensor: torch.Tensor) -> int:
    return checksum(tensor.detach().contiguous().view(-1).view(torch.uint8))


def read_run_config(run_dir: Path) -> tuple[Config, str]:
    """The config the run was trained with, which replay must reuse exactly, and its job nonce."""
    path = run_dir / RUN_CONFIG
    try:
        return read_run_record(run_dir)
    except OSError as error:
        raise ExportError(f"{path}: missing or unreadable ({error.strerror}); RUN_DIR must be a run's persist "
                          "directory (persist_dir/<run_id>), written by a job with snapshot.persist_dir set") from None
    except (ValueError, MoetionError) as error:
        raise ExportError(f"{path}: not a valid run config ({error})") from None


def _pick_window(run_dir: Path, *, num_stages: int, iteration: int | None) -> int:
    """The start of the window to export: ``iteration``, or the newest one every stage persisted."""
    starts: dict[int, list[int]] = {}
    for stage, replica, start, _ in iter_window_dirs(run_dir):
        if replica == 0:
            starts.setdefault(stage, []).append(start)
    beyond = sorted(set(starts) - set(range(num_stages)))
    if beyond:
        raise ExportError(f"{run_dir} holds windows of stages {beyond}, but the job has {num_stages} stages: "
                          "the model definition does not match the run")
    for stage in range(num_stages):
        if stage not in starts:
            raise ExportError(f"{run_dir / f'stage-{stage:03d}'}: stage {stage} has no persisted window "
                              "(missing stage files)")
    if iteration is not None:
        return iteration
    # By directory, not by readable manifest (as newest_common_window does): a damaged newest window
    # must be an error naming it, not a silent export of an older one.
    common = set.intersection(*(set(starts[stage]) for stage in range(num_stages)))
    if not common:
        raise ExportError(f"no window under {run_dir} was persisted by all {num_stages} stages "
                          f"(windows start at {dict(sorted(starts.items()))}, by stage)")
    return max(common)


def _check_windows(run_dir: Path, *, num_stages: int, start: int, run_id: str | None,
                   job_nonce: str) -> list[WindowManifest]:
    """Every stage's window at ``start`` exists, is readable, and belongs to the same run and window."""
    manifests = []
    for stage in range(num_stages):
        path = window_path(run_dir, stage=stage, replica=0, start_iteration=start)
        if not path.is_dir():
            have = [t for s, r, t, _ in iter_window_dirs(run_dir) if (s, r) == (stage, 0)]
            raise ExportError(f"{path}: missing: stage {stage} has no window starting at iteration {start} "
                              f"(its windows start at {have})")
        try:
            m = read_manifest(path)
        except SnapshotError as error:
            raise ExportError(f"stage {stage}: {error}; to export an older window pass its start as iteration "
                              "(--iteration)") from None
        expected = run_id or (manifests[0].run_id if manifests else m.run_id)
        if m.run_id != expected:
            raise ExportError(f"{path / MANIFEST}: window of run {m.run_id!r} in run {expected!r} ({run_dir}): "
                              "windows from different runs are mixed")
        if m.job_nonce != job_nonce:
            raise ExportError(f"{path / MANIFEST}: window of job {m.job_nonce}, but {run_dir / RUN_CONFIG} records job "
                              f"{job_nonce}: windows from different jobs are mixed")
        if manifests and m.window != manifests[0].window:
            raise ExportError(f"{path / MANIFEST}: window of {m.window} iterations, stage 0's has "
                              f"{manifests[0].window}: windows from different runs are mixed")
        manifests.append(m)
    return manifests


def _convert_all(run_dir: Path, *, job: JobSpec, config: Config, start: int, stage_dir: Path, nproc: int,
                 with_optimizer: bool, progress: Callable[[str], None]) -> list[dict]:
    """Converts every stage in ``nproc`` forked workers (stage s goes to worker s mod nproc)."""
    results = run_workers(_convert_share, nproc=nproc,
                          args=(run_dir, job, config, start, stage_dir, nproc, with_optimizer, progress))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise ExportError("; ".join(errors))
    return [report for r in results for report in r["stages"]]


def _convert_share(run_dir: Path, job: JobSpec, config: Config, start: int, stage_dir: Path, nproc: int,
                   with_optimizer: bool, progress: Callable[[str], None]) -> dict:
    """One worker's stages; a bad input comes back as a message, not a traceback."""
    rank, reports = env.rank_env().rank, []
    torch.set_num_threads(1)  # no inherited OpenMP pool until replay sets the run's own thread count
    try:
        for stage in range(rank, job.num_stages, nproc):
            reports.append(_convert_stage(run_dir, job=job, config=config, stage=stage, start=start,
                                          stage_dir=stage_dir, with_optimizer=with_optimizer))
            r = reports[-1]
            progress(f"stage {stage}/{job.num_stages}: window {start}..{r['until']}, replayed {r['replayed']} "
                     f"iterations, {r['seconds']:.1f} s")
    except ExportError as error:
        return {"error": str(error)}
    return {"stages": reports}


def _convert_stage(run_dir: Path, *, job: JobSpec, config: Config, stage: int, start: int, stage_dir: Path,
                   with_optimizer: bool) -> dict:
    """Replays one stage and writes its dense state to its own file, releasing it before returning."""
    began = time.perf_counter()
    where = window_path(run_dir, stage=stage, replica=0, start_iteration=start)
    try:
        dense = dense_state_from_persisted(
            run_dir, stage=stage, start_iteration=start, layers=job.layers, num_stages=job.num_stages,
            loss_fn=job.loss_fn, optimizer=job.optimizer, config=config, data=job.data,
            partition_method=job.partition_method, module_seed=job.module_seed, lr_scheduler=job.lr_scheduler)
    except MoetionError as error:
        raise ExportError(f"stage {stage} ({where}): {error}") from None
    except LogStoreError as error:
        raise ExportError(f"stage {stage}: {_bad_logs(run_dir, start=start, num_stages=job.num_stages)}: corrupted "
                          f"upstream logs ({error}); this window cannot be replayed, try an older one") from None
    except RuntimeError as error:  # e.g. a snapshot tensor whose shape the model's parameter lacks
        raise ExportError(f"stage {stage} ({where}): the window does not fit the model definition: {error}") from None
    model = dense["model"]
    path = stage_dir / f"stage-{stage:03d}.tree"
    path.write_bytes(tensor_tree.encode({
        "iteration": dense["iteration"], "model": model,
        "checksums": {name: tensor_checksum(t) for name, t in model.items()},
        "optimizer": dense["optimizer"] if with_optimizer else None}))
    return {"stage": stage, "path": str(path), "until": dense["iteration"], "replayed": dense["iteration"] - start,
            "seconds": time.perf_counter() - began}


def _check_replica_windows(run_dir: Path, *, job: JobSpec, start: int, replicas: int, ep_size: int) -> None:
    """Every replica of every stage persisted the window (each holds its own experts under EP)."""
    for stage in range(job.num_stages):
        for replica in range(replicas):
            path = window_path(run_dir, stage=stage, replica=replica, start_iteration=start)
            if path.is_dir():
                continue
            held = ""
            if ep_size > 1:
                held = (f"; it holds {held_experts(job, stage=stage, shard=ExpertShard(ep_size, replica % ep_size))}, "
                        "so those experts are missing")
            raise ExportError(f"{path}: missing: replica {replica} of stage {stage} has no window starting at "
                              f"iteration {start}{held}")


def _convert_replicated(run_dir: Path, *, job: JobSpec, config: Config, start: int, stage_dir: Path, replicas: int,
                        ep_size: int, progress: Callable[[str], None]) -> list[dict]:
    """Each stage's replicas replay together (one stage at a time), then its experts are gathered."""
    reports = []
    for stage in range(job.num_stages):
        began = time.perf_counter()
        parts, errors = replay_replicas(run_dir, job=job, config=config, stage=stage, start=start, replicas=replicas,
                                        ep_size=ep_size, out_dir=stage_dir)
        if errors:
            raise ExportError("; ".join(errors))
        try:
            model = gather_stage(parts, job=job, stage=stage, ep_size=ep_size)
        except MoetionError as error:
            raise ExportError(str(error)) from None
        until = read_manifest(window_path(run_dir, stage=stage, replica=0, start_iteration=start)).end_iteration
        path = stage_dir / f"stage-{stage:03d}.tree"
        path.write_bytes(tensor_tree.encode({
            "iteration": until, "model": model, "checksums": {name: tensor_checksum(t) for name, t in model.items()},
            "optimizer": None}))
        reports.append({"stage": stage, "path": str(path), "until": until, "replayed": until - start,
                        "seconds": time.perf_counter() - began})
        progress(f"stage {stage}/{job.num_stages}: {replicas} replicas replayed window {start}..{until} together, "
                 f"{reports[-1]['seconds']:.1f} s")
    return reports


def _bad_logs(run_dir: Path, *, start: int, num_stages: int) -> str:
    """Which persisted log file of window ``start`` fails to import (replay's error does not say)."""
    bad = []
    for stage in range(num_stages):
        path = window_path(run_dir, stage=stage, replica=0, start_iteration=start) / LOGS
        store = LogStore()
        try:
            store.import_(load_window_logs(path.parent))
        except (LogStoreError, SnapshotError):
            bad.append(str(path))
        finally:
            store.close()
    return ", ".join(bad) or f"the logs of window {start}"


def _merge(reports: list[dict], *, run_id: str, with_optimizer: bool) -> dict:
    """One state dict keyed like the unpartitioned model, read from the stage files by memory map.

    A tied weight is held by several stages: it is kept once, after checking the copies are equal.
    """
    dense: dict = {"iteration": reports[0]["until"], "model": {}, "checksums": {}, "run_id": run_id}
    if with_optimizer:
        dense["optimizer"] = {}
    owner: dict[str, int] = {}
    for report in reports:
        part = _read_stage_part(Path(report["path"]))
        for name, tensor in part["model"].items():
            if name in dense["model"]:
                if not torch.equal(dense["model"][name], tensor):
                    raise ExportError(f"{name} is held by stages {owner[name]} and {report['stage']} with different "
                                      "values: the tied copies diverged; the run's windows are inconsistent")
                continue
            dense["model"][name], owner[name] = tensor, report["stage"]
            dense["checksums"][name] = part["checksums"][name]
        if with_optimizer:
            dense["optimizer"][report["stage"]] = part["optimizer"]
    return dense


def _read_stage_part(path: Path) -> dict:
    """A stage's converted state, mapped copy-on-write (its tensors are views of the mapping)."""
    try:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(file.fileno()).st_size else b""
        return _one_dtype_per_mapping(tensor_tree.decode(memoryview(mapped), source=str(path)))
    except (OSError, ValueError, MoetionError) as error:
        raise ExportError(f"{path}: a converted stage cannot be read back ({error}); export again") from None


def _one_dtype_per_mapping(part: dict) -> dict:
    """Copies out of the mapping every tensor not of the stage's main dtype (by bytes): ``torch.save``
    refuses views of one storage as different dtypes (an int64 ``num_batches_tracked`` beside fp32
    weights). Those are buffers and scalars, small next to the weights that stay mapped."""
    found: list[tuple[dict | list, Any, torch.Tensor]] = []

    def collect(node: Any) -> None:
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(value, torch.Tensor):
                found.append((node, key, value))
            elif isinstance(value, (dict, list)):
                collect(value)
    collect(part)
    size: dict[torch.dtype, int] = {}
    for _, _, tensor in found:
        size[tensor.dtype] = size.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    main = max(size, key=size.get, default=None)
    for node, key, tensor in found:
        if tensor.dtype != main:
            node[key] = tensor.clone()
    return part


def _save_atomically(obj: dict, out: Path) -> None:
    """``torch.save`` under an unpredictable temporary name (created 0600, O_EXCL) in OUT's
    directory, fsync, rename onto OUT, fsync the directory."""
    tmp = temp_name(out)
    try:
        with os.fdopen(create_exclusive(tmp), "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


def _save_dcp_atomically(model: dict, directory: Path) -> None:
    """The model as a ``torch.distributed.checkpoint`` directory (0700, files 0600), written aside
    then renamed into place."""
    tmp = temp_name(directory)
    try:
        private_dir(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns that no process group is initialised: intended here
            dcp.save({"model": model}, checkpoint_id=str(tmp))
        for path in tmp.rglob("*"):
            os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE, follow_symlinks=False)
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(directory.parent)


def _print_line(line: str) -> None:
    print(line, flush=True)


class _StageProgress:
    """A bar in this process over the stages that forked workers finish: each worker writes a
    newline to a pipe it inherited, and a thread here advances the bar per newline."""

    def __init__(self, *, total: int, quiet: bool) -> None:
        self.bar = Progress(total=total, desc="export: stages", quiet=quiet)
        self._read, self._write = os.pipe() if self.bar.enabled else (-1, -1)
        self._thread = threading.Thread(target=self._follow, name="moetion-export-progress", daemon=True)
        if self.bar.enabled:
            self._thread.start()

    def line(self, _: str) -> None:
        """The workers' progress callback."""
        os.write(self._write, b"\n")

    def _follow(self) -> None:
        with os.fdopen(self._read, "rb") as lines:
            for _ in lines:  # ends when every copy of the write end is closed
                self.bar.update()

    def __enter__(self) -> "_StageProgress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar.enabled:
            os.close(self._write)
            self._thread.join(timeout=PROGRESS_JOIN_S)
        self.bar.close()
