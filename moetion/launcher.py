"""Starting the ranks of a job on this host and watching them.

The launcher hosts the job's ``TCPStore`` itself (so it outlives any rank) and gives every rank
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_USE_AGENT_STORE), so a script runs unchanged under ``torchrun`` or ``moetion launch``.

Two ways to start ranks, one supervision loop:
- :func:`launch_script` runs a Python script per rank in a fresh interpreter;
- :func:`run_workers` forks the current process per rank and calls a function (0.1 s instead of
  seconds of ``import torch`` per rank; the parent must not have run multi-threaded torch work).
When a rank fails, the others get a grace period to notice and exit, then are killed; the error
names every rank that failed and how.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from moetion.errors import LaunchError

GRACE_S = 10.0  # how long survivors get to exit on their own after a rank fails
POLL_S = 0.05


@dataclass
class _Worker:
    rank: int
    handle: subprocess.Popen | mp.process.BaseProcess
    result_pipe: Connection | None = None
    result: Any = None
    error: str | None = None
    exited_at: float = float("inf")

    def exit_code(self) -> int | None:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll()
        return self.handle.exitcode

    def kill(self) -> None:
        if self.exit_code() is None:
            self.handle.kill()

    def collect(self) -> None:
        """Reads the function result or formatted exception a forked worker sent, if any."""
        if self.result_pipe is None or not self.result_pipe.poll():
            return
        try:
            status, payload = torch.load(io.BytesIO(self.result_pipe.recv_bytes()), weights_only=True)
        except EOFError:  # the worker died without reporting; its exit code tells how
            self.result_pipe = None
            return
        if status == "ok":
            self.result = payload
        else:
            self.error = payload


def host_store(world_size: int) -> dist.TCPStore:
    """A TCPStore served by this process on a free loopback port."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)


def rank_env(*, rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }


RESUME_ENV = "MOETION_RESUME"


def launch_script(
    script: str,
    script_args: Sequence[str],
    *,
    nproc: int,
    timeout_s: float | None = None,
    grace_s: float = GRACE_S,
    resume: bool = False,
) -> None:
    """Runs ``python script *script_args`` as ``nproc`` ranks; raises LaunchError if any fails.

    ``resume`` sets ``MOETION_RESUME=1`` for the ranks: see :func:`moetion.resume_requested`.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if not os.path.isfile(script):
        raise LaunchError(f"training script {script!r} does not exist")
    store = host_store(nproc)
    workers = []
    for rank in range(nproc):
        env = {**os.environ, **rank_env(rank=rank, world_size=nproc, port=store.port)}
        if resume:
            env[RESUME_ENV] = "1"
        workers.append(_Worker(rank, subprocess.Popen([sys.executable, script, *script_args], env=env)))
    try:
        _supervise(workers, timeout_s=timeout_s, grace_s=grace_s)
    finally:
        del store  # stops its server thread even when a traceback outlives this frame


def run_workers(
    fn: Callable[..., Any], *, nproc: int, args: tuple = (), timeout_s: float | None = None, grace_s: float = GRACE_S
) -> list[Any]:
    """Forks ``nproc`` ranks, each calling ``fn(*args)`` with torchrun's environment set.

    Returns the ranks' return values in rank order; raises LaunchError with each failed rank's
    traceback if any rank raises, dies, or the whole group exceeds ``timeout_s``.
    """
    if nproc < 1:
        raise LaunchError(f"nproc must be >= 1, got {nproc}")
    context = mp.get_context("fork")
    workers, port_pipes = [], []
    # Fork before starting the store: its server thread must not exist while the parent forks.
    for rank in range(nproc):
        receiver, sender = context.Pipe(duplex=False)
        port_receiver, port_sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_forked_main, args=(fn, args, rank, nproc, port_receiver, sender), name=f"moetion-rank{rank}"
        )
        process.start()
        sender.close()
        port_receiver.close()
        workers.append(_Worker(rank, process, receiver))
        port_pipes.append(port_sender)
    store = host_store(nproc)
    for pipe in port_pipes:
        pipe.send(store.port)
        pipe.close()
    try:
        _supervise(workers, timeout_s=timeout_s, grace_s=grace_s)
    finally:
        del store  # a live server thread would make the next fork unsafe
    return [w.result for w in workers]


def _forked_main(
    fn: Callable[..., Any], args: tuple, rank: int, world_size: int, port_pipe: Connection, result_pipe: Connection
) -> None:
    port = port_pipe.recv()
    port_pipe.close()
    os.environ.update(rank_env(rank=rank, world_size=world_size, port=port))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        result = fn(*args)
        status, payload = "ok", result
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit, to the parent
        status, payload = "error", traceback.format_exc()
    try:
        # torch.save, not the pipe's pickling: that shares tensors through handles that vanish
        # when this process exits, before the parent has read them.
        buffer = io.BytesIO()
        torch.save((status, payload), buffer)
        result_pipe.send_bytes(buffer.getvalue())
    finally:
        result_pipe.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if status == "error":
        sys.exit(1)


def _supervise(workers: list[_Worker], *, timeout_s: float | None, grace_s: float) -> None:
    """Waits for all workers; on the first failure gives the rest ``grace_s``, then kills them."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    kill_at = None
    timed_out = False
    while True:
        for w in workers:
            w.collect()
        now = time.monotonic()
        codes = [w.exit_code() for w in workers]
        for w, code in zip(workers, codes):
            if code is not None and w.exited_at == float("inf"):
                w.exited_at = now
        if all(c is not None for c in codes):
            break
        failed = any(c not in (None, 0) for c in codes)
        if failed and kill_at is None:
            kill_at = now + grace_s
        if deadline is not None and now > deadline and kill_at is None:
            timed_out, kill_at = True, now
        if kill_at is not None and now >= kill_at:
            for w in workers:
                w.kill()
        time.sleep(POLL_S)
    for w in workers:
        w.collect()
        if isinstance(w.handle, mp.process.BaseProcess):
            w.handle.join()
    # Root causes first: a rank that failed on its own, before those that lost it as a peer.
    failures = sorted(
        (w for w in workers if w.exit_code() != 0),
        key=lambda w: (w.error is not None and "PeerFailure" in w.error, w.exited_at),
    )
    if not failures and not timed_out:
        return
    lines = [f"timed out after {timeout_s} s" if timed_out else f"{len(failures)} of {len(workers)} ranks failed"]
    for w in failures:
        lines.append(f"rank {w.rank}: {_describe_exit(w.exit_code())}")
        if w.error:
            lines.append("  " + w.error.strip().replace("\n", "\n  "))
    raise LaunchError("\n".join(lines))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
