"""Starting the ranks of a job on this host under a :class:`~moetion.supervisor.Supervisor`.

The job's control store runs in a process of its own, started first (so it outlives any rank and
the supervisor can fork replacements later). Every rank gets torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE),
so a script runs unchanged under ``torchrun`` or ``moetion launch``.

Two ways to start ranks, one supervisor:
- :func:`launch_script` runs a Python script per rank in a fresh interpreter;
- :func:`run_workers` forks the current process per rank and calls a function (0.1 s instead of
  seconds of ``import torch`` per rank; the parent must not have run multi-threaded torch work).
With ``recover=True`` a rank killed by a signal is replaced and the survivors rebuild the job
around it (:mod:`moetion.recovery`); otherwise the first failure ends the job, naming every rank
that failed and how.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.distributed as dist

from moetion import env as variables
from moetion.control import ControlPlane, serve_store
from moetion import tensor_tree
from moetion.errors import LaunchError
from moetion.job_secret import new_secret, secret_from_env
from moetion.hosts import HostWatch, StandbyWatch, resume_command
from moetion.rank_entry import install_hooks
from moetion.spare import Identity, SparePool, warm_torch
from moetion.supervisor import GRACE_S, REJOIN_TIMEOUT_S, JobReport, Spawn, Supervisor, Worker
from moetion.timeouts import check_supervisor, supervisor_env


@dataclass(frozen=True)
class Nodes:
    """Where this launcher sits in a multi-host job: ``nnodes`` launchers, one per host, each
    running ``nproc`` ranks; node 0 serves the control store on ``master_addr:master_port``."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    def __post_init__(self) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank must lie in [0, --nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.master_port:
            raise LaunchError("a multi-host job needs --master-port (node 0 serves the control store there)")

    def ranks(self, nproc: int) -> range:
        return range(self.node_rank * nproc, (self.node_rank + 1) * nproc)


def job_secret(nodes: Nodes) -> str:
    """The job's secret: the operator's ``MOETION_JOB_SECRET`` if set (a multi-host job needs the
    same value on every host, so there it must be set), else a fresh one for this one-host job."""
    secret = secret_from_env()
    if secret is not None:
        return secret
    if nodes.nnodes > 1:
        raise LaunchError(f"a multi-host job needs the same secret on every host: export {variables.JOB_SECRET} (e.g. "
                          "`python -c 'import secrets; print(secrets.token_hex(32))'`) on each host before launching")
    return new_secret()


def rank_env(*, rank: int, world_size: int, port: int, secret: str, generation: int = 0, supervised: bool = False,
             nproc: int | None = None, nodes: Nodes = Nodes()) -> dict[str, str]:
    local_world = world_size if nproc is None else nproc
    env = {
        variables.RANK: str(rank),
        variables.WORLD_SIZE: str(world_size),
        variables.LOCAL_RANK: str(rank % local_world),
        variables.LOCAL_WORLD_SIZE: str(local_world),
        "GROUP_RANK": str(nodes.node_rank),
        variables.MASTER_ADDR: nodes.master_addr,
        variables.MASTER_PORT: str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        variables.GENERATION: str(generation),
        variables.JOB_SECRET: secret,  # the environment only: never argv, never a log line
    }
    if supervised:
        env[variables.SUPERVISED] = "1"
    return env



def launch_script(
    script: str,
    script_args: Sequence[str],
    *,
    nproc: int,
    timeout_s: float | None = None,
    grace_s: float = GRACE_S,
    resume: bool = False,
    recover: bool = True,
    max_restarts: int = 8,
    heartbeat_timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
    nodes: Nodes = Nodes(),
    spares: int = 1,
    standby: bool = False,
) -> JobReport:
    """Runs ``python script *script_args`` as ``nproc`` ranks on this host; raises LaunchError if
    the job fails.

    ``resume`` sets ``MOETION_RESUME=1`` for the ranks: see :func:`moetion.resume_requested`.
    ``recover`` replaces ranks killed by a signal (at most ``max_restarts`` times). ``env`` is
    added to the ranks' environment. With ``nodes``, this is one host of a multi-host job (run
    the same command on every host with its ``node_rank``). ``spares`` warm interpreters wait to
    become replacements (:mod:`moetion.spare`; 0: every replacement is a fresh interpreter).
    With ``standby`` this host joins a running multi-host job as a standby: it waits until a host
    (node 1 or later) stops answering, takes over its node rank and starts its ranks as
    replacements (:mod:`moetion.hosts`); it returns at once if the job ends without needing it.
    """
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    if not os.path.isfile(script):
        raise LaunchError(f"training script {script!r} does not exist")
    if spares < 0:
        raise LaunchError(f"--spares must be >= 0, got {spares}")

    check_supervisor(heartbeat_timeout_s=heartbeat_timeout_s, job_timeout_s=timeout_s)
    extra = {**supervisor_env(heartbeat_timeout_s=heartbeat_timeout_s, job_timeout_s=timeout_s), **(env or {})}
    fault_log = _fault_log(extra)
    secret = job_secret(nodes)
    first_generation = 0
    if standby:
        taken = _stand_by(nodes, secret=secret, heartbeat_timeout_s=heartbeat_timeout_s, nproc=nproc)
        if taken is None:
            return JobReport([], [])
        nodes, first_generation = taken
    base_env = {**os.environ, **extra, variables.FAULT_LOG: fault_log}
    pool = SparePool(script, count=spares if recover else 0, env=base_env)

    def spawn(rank: int, generation: int, port: int) -> Worker:
        rank_vars = rank_env(rank=rank, world_size=nproc * nodes.nnodes, port=port, secret=secret,
                             generation=generation, supervised=recover, nproc=nproc, nodes=nodes)
        full = {**base_env, **rank_vars}
        if resume:
            full[variables.RESUME] = "1"
        if generation > 0:  # a replacement: a warm spare if one is alive
            spare = pool.take(Identity(argv=(script, *script_args), env=full))
            if spare is not None:
                return Worker(rank, spare, kind="spare")
        return Worker(rank, subprocess.Popen([sys.executable, "-m", "moetion.rank_entry", script, *script_args],
                                             env=full), kind="fresh")

    resume_hint = resume_command(script=script, script_args=list(script_args), nproc=nproc, nnodes=nodes.nnodes,
                                 master_addr=nodes.master_addr, master_port=nodes.master_port)
    try:
        return _supervise(spawn, nproc=nproc, nodes=nodes, secret=secret, recover=recover, max_restarts=max_restarts,
                          fault_log=fault_log, heartbeat_timeout_s=heartbeat_timeout_s, timeout_s=timeout_s,
                          grace_s=grace_s, resume_command=resume_hint, first_generation=first_generation)
    finally:
        pool.close()


def _stand_by(nodes: Nodes, *, secret: str, heartbeat_timeout_s: float, nproc: int) -> tuple[Nodes, int] | None:
    """Waits as a standby host; once it took a lost host over: (that host's place, the generation
    its ranks start in, published here with the failure notice that wakes the other hosts' ranks)."""
    if nodes.nnodes < 2:
        raise LaunchError("--standby needs a multi-host job: give its --nnodes, --master-addr and --master-port")
    control = ControlPlane(nodes.master_addr, nodes.master_port, secret=secret)
    watch = StandbyWatch(control, nnodes=nodes.nnodes, timeout_s=heartbeat_timeout_s)
    node = watch.wait_for_lost_host(progress=lambda line: print(f"moetion standby: {line}", flush=True))
    if node is None:
        print("moetion standby: the job ended without needing this host", flush=True)
        return None
    generation = control.announce_generation(f"host {node} stopped answering; a standby host took it over",
                                             world_size=nproc * nodes.nnodes)
    print(f"moetion standby: took over host {node}; its ranks start in generation {generation}", flush=True)
    return Nodes(nnodes=nodes.nnodes, node_rank=node, master_addr=nodes.master_addr,
                 master_port=nodes.master_port), generation


def run_workers(fn: Callable[..., Any], *, nproc: int, args: tuple = (), **options: Any) -> list[Any]:
    """Forks ``nproc`` ranks, each calling ``fn(*args)`` with torchrun's environment set.

    Returns the ranks' return values in rank order (a replacement's, for a replaced rank); raises
    LaunchError with each failed rank's traceback if the job fails. ``options`` are those of
    :func:`supervise_workers`, which also returns the recoveries.
    """
    return supervise_workers(fn, nproc=nproc, args=args, **options).results


def supervise_workers(
    fn: Callable[..., Any],
    *,
    nproc: int,
    args: tuple = (),
    timeout_s: float | None = None,
    grace_s: float = GRACE_S,
    recover: bool = False,
    max_restarts: int = 8,
    heartbeat_timeout_s: float = 30.0,
    rejoin_timeout_s: float = REJOIN_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> JobReport:
    """:func:`run_workers`, returning the whole :class:`~moetion.supervisor.JobReport`.

    ``timeout_s`` bounds the whole job; ``recover`` replaces ranks killed by a signal (at most
    ``max_restarts`` times) or silent for ``heartbeat_timeout_s``, and names a survivor not back in
    a new generation within ``rejoin_timeout_s``; ``env`` is added to the ranks'
    environment. The parent must not have run multi-threaded torch work (it forks).
    """
    if nproc < 1:
        raise LaunchError(f"nproc must be >= 1, got {nproc}")
    context = mp.get_context("fork")
    _preload_for_forks()
    check_supervisor(heartbeat_timeout_s=heartbeat_timeout_s, job_timeout_s=timeout_s)
    extra = {**supervisor_env(heartbeat_timeout_s=heartbeat_timeout_s, job_timeout_s=timeout_s), **(env or {})}
    extra[variables.FAULT_LOG] = _fault_log(extra)
    secret = job_secret(Nodes())

    def spawn(rank: int, generation: int, port: int) -> Worker:
        receiver, sender = context.Pipe(duplex=False)
        rank_vars = {**extra, **rank_env(rank=rank, world_size=nproc, port=port, secret=secret, generation=generation,
                                         supervised=recover)}
        process = context.Process(target=_forked_main, args=(fn, args, rank_vars, sender), name=f"moetion-rank{rank}")
        process.start()
        sender.close()
        return Worker(rank, process, receiver)

    return _supervise(spawn, nproc=nproc, secret=secret, recover=recover, max_restarts=max_restarts,
                      heartbeat_timeout_s=heartbeat_timeout_s, rejoin_timeout_s=rejoin_timeout_s, timeout_s=timeout_s,
                      grace_s=grace_s, fault_log=extra[variables.FAULT_LOG])


def _preload_for_forks() -> None:
    """Forked ranks (and replacements) inherit the parent's imports. The first meta-device op
    imports torch's reference kernels lazily: pay that once in the parent instead of in every rank,
    and in every replacement."""
    warm_torch()


def _fault_log(env: dict[str, str]) -> str:
    """Where kills are recorded: the caller's choice, else a fresh file that lives as long as the
    job (kills fire once per job: a replacement must not die again at its predecessor's point)."""
    path = env.get(variables.FAULT_LOG) or variables.fault_log()
    if path:
        return path
    handle, path = tempfile.mkstemp(prefix=_OWN_FAULT_LOG, suffix=".jsonl")
    os.close(handle)
    return path


_OWN_FAULT_LOG = "moetion-kills-"


def _supervise(spawn: Spawn, *, nproc: int, fault_log: str, secret: str, nodes: Nodes = Nodes(),
               resume_command: str = "", first_generation: int = 0, **options: Any) -> JobReport:
    serves = nodes.node_rank == 0
    store_process, port = serve_store(nodes.master_port, bind=nodes.master_addr) if serves else (None, nodes.master_port)
    try:
        control = ControlPlane(nodes.master_addr, port, secret=secret)
        hosts = HostWatch(control, node_rank=nodes.node_rank, nnodes=nodes.nnodes, nproc=nproc,
                          timeout_s=options["heartbeat_timeout_s"], resume_command=resume_command) if nodes.nnodes > 1 else None
        supervisor = Supervisor(spawn, world_size=nproc * nodes.nnodes, ranks=nodes.ranks(nproc), control=control,
                                fault_log=Path(fault_log), hosts=hosts, first_generation=first_generation, **options)
        try:
            return supervisor.run()
        finally:
            if not supervisor.store_lost:
                control.host_finished(nodes.node_rank)
            if store_process is not None and not supervisor.store_lost:
                _wait_for_other_hosts(control, nodes.nnodes, lost=hosts.lost if hosts is not None else set())
    finally:
        if store_process is not None:
            store_process.terminate()
            store_process.join()
        if Path(fault_log).name.startswith(_OWN_FAULT_LOG):
            Path(fault_log).unlink(missing_ok=True)


def _wait_for_other_hosts(control: ControlPlane, nnodes: int, *, lost: set[int], timeout_s: float = 120.0) -> None:
    """Node 0 serves the control store: it stays up until every host's supervisor is done with it
    (a host declared lost never will be)."""
    deadline = time.monotonic() + timeout_s
    alive = [n for n in range(nnodes) if n not in lost]
    while not control.hosts_done(alive) and time.monotonic() < deadline:
        time.sleep(0.05)


def _forked_main(fn: Callable[..., Any], args: tuple, rank_vars: dict[str, str], result_pipe: Connection) -> None:
    os.environ.update(rank_vars)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    install_hooks()
    try:
        result = fn(*args)
        status, payload = "ok", result
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit, to the parent
        status, payload = "error", traceback.format_exc()
    try:
        # A tensor tree, not the pipe's pickling: that shares tensors through handles that vanish
        # when this process exits, and the parent must not unpickle what a worker wrote.
        try:
            data = tensor_tree.encode((status, payload))
        except TypeError as error:
            status, data = "error", tensor_tree.encode(("error", f"the result cannot be sent to the parent: {error}"))
        result_pipe.send_bytes(data)
    finally:
        result_pipe.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if status == "error":
        sys.exit(1)
