"""The control plane: one key-value store, shared by the supervisor(s) and every rank of the job.

It outlives every rank (a process of its own, started before any rank), so a replacement and the
survivors of a failure can meet there. What lives in it:

- ``generation``: how many times the job's process group was rebuilt (bumped atomically by the
  supervisor that replaces a rank). Generation ``g`` forms its gloo/NCCL group through
  ``PrefixStore("gen{g}/")``: a fresh prefix per group, because reusing one fails to connect;
- ``gen{g}/arrived/{rank}``, ``gen{g}/ready/{rank}``, ``gen{g}/done/{rank}``: a rank joined
  generation ``g``; a replacement finished restoring its state; a rank finished training;
- ``heartbeat/{rank}``: a counter each rank's heartbeat thread bumps every second, so the
  supervisor notices a hung rank (no exit, no progress);
- ``fatal``: a message that ends the job: nothing can recover exactly;
- ``events/{g}/{rank}``: what a rank did during the recovery that formed generation ``g`` (JSON),
  read back by the supervisor for the recovery timeline;
- ``host/{n}/finished``: host ``n``'s supervisor is done (node 0 serves the store until all are).

Nothing here runs per iteration: ranks touch the store only while joining and recovering, and the
heartbeat thread once a second.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from moetion.errors import MoetionError
from moetion.recovery.records import RecoveryEvents

GENERATION_ENV = "MOETION_GENERATION"  # the generation a process was started into
SUPERVISED_ENV = "MOETION_SUPERVISED"  # "1": a supervisor will replace dead ranks
HEARTBEAT_S = 1.0
POLL_S = 0.02


class JobAborted(MoetionError):
    """The supervisor or another rank declared the job unrecoverable; the message says why."""


def supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def start_generation() -> int:
    return int(os.environ.get(GENERATION_ENV, "0"))


class ControlPlane:
    """A client of the job's control store (a rank's or a supervisor's view)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 300.0) -> None:
        self.host, self.port = host, port
        self.store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=timedelta(seconds=timeout_s))

    @classmethod
    def from_env(cls, *, timeout_s: float = 300.0) -> "ControlPlane":
        return cls(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout_s=timeout_s)

    # -- generations ------------------------------------------------------------------------------
    def generation(self) -> int:
        return int(self.store.get("generation")) if self.store.check(["generation"]) else 0

    def new_generation(self) -> int:
        """Supervisor: the next generation's number, atomically (several supervisors may bump at
        once; each gets its own). Survivors join it as soon as it appears."""
        return self.store.add("generation", 1)

    def group_store(self, generation: int) -> dist.Store:
        return dist.PrefixStore(f"gen{generation}/", self.store)

    def wait_for_generation_after(self, generation: int, *, timeout_s: float) -> int:
        """Blocks until the supervisor publishes a generation newer than ``generation``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.raise_if_fatal()
            current = self.generation()
            if current > generation:
                return current
            if time.monotonic() > deadline:
                raise JobAborted(
                    f"no new generation after {generation} within {timeout_s:g} s: the supervisor did not "
                    "replace a failed rank (is this job running under `moetion launch`?)"
                )
            time.sleep(POLL_S)

    def arrive(self, generation: int, rank: int, world_size: int, *, timeout_s: float) -> bool:
        """Marks ``rank`` as present in ``generation`` and waits for all ranks; False if a newer
        generation was published meanwhile (a rank of this one died before it formed)."""
        self.store.set(f"gen{generation}/arrived/{rank}", "1")
        keys = [f"gen{generation}/arrived/{r}" for r in range(world_size)]
        return self._wait_keys(keys, generation, timeout_s=timeout_s, what="every rank to join")

    def mark_ready(self, generation: int, rank: int) -> None:
        self.store.set(f"gen{generation}/ready/{rank}", "1")

    def wait_ready(self, generation: int, ranks: list[int], *, timeout_s: float) -> bool:
        """Waits until every replacement in ``ranks`` restored its state; False if the generation moved on."""
        keys = [f"gen{generation}/ready/{r}" for r in ranks]
        return self._wait_keys(keys, generation, timeout_s=timeout_s, what=f"replacement(s) {ranks} to restore")

    def mark_done(self, generation: int, rank: int) -> None:
        self.store.set(f"gen{generation}/done/{rank}", "1")

    def wait_done(self, generation: int, world_size: int, *, timeout_s: float) -> bool:
        """Waits until every rank finished training; False if a newer generation was published."""
        keys = [f"gen{generation}/done/{r}" for r in range(world_size)]
        return self._wait_keys(keys, generation, timeout_s=timeout_s, what="every rank to finish")

    def host_finished(self, node_rank: int) -> None:
        """A host's supervisor is done with the store (its ranks exited, its records read)."""
        self.store.set(f"host/{node_rank}/finished", "1")

    def hosts_finished(self, nnodes: int) -> bool:
        return self.store.check([f"host/{n}/finished" for n in range(nnodes)])

    def _wait_keys(self, keys: list[str], generation: int, *, timeout_s: float, what: str) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            self.raise_if_fatal()
            if self.generation() > generation:
                return False
            if time.monotonic() > deadline:
                raise JobAborted(f"generation {generation}: waited {timeout_s:g} s for {what}")
            time.sleep(POLL_S)
        return True

    # -- the end of the job -------------------------------------------------------------------------
    def declare_fatal(self, message: str) -> None:
        self.store.set("fatal", message)

    def fatal(self) -> str | None:
        return self.store.get("fatal").decode() if self.store.check(["fatal"]) else None

    def raise_if_fatal(self) -> None:
        message = self.fatal()
        if message is not None:
            raise JobAborted(message)

    # -- records ------------------------------------------------------------------------------------
    def record(self, generation: int, rank: int, events: RecoveryEvents) -> None:
        self.store.set(f"events/{generation}/{rank}", events.to_json())

    def records(self, generation: int, ranks: range) -> dict[int, RecoveryEvents]:
        """Every rank's recovery events of ``generation``; a malformed record is skipped with a warning."""
        found = {}
        for rank in ranks:
            key = f"events/{generation}/{rank}"
            if self.store.check([key]):
                events = RecoveryEvents.from_json(self.store.get(key))
                if events is not None:
                    found[rank] = events
        return found

    # -- liveness -------------------------------------------------------------------------------------
    def heartbeats(self, ranks: list[int]) -> dict[int, int]:
        return {r: self.store.add(f"heartbeat/{r}", 0) for r in ranks}

    def start_heartbeat(self, rank: int) -> None:
        """Bumps ``heartbeat/{rank}`` every second from a daemon thread with its own connection."""
        store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False)

        def beat() -> None:
            while True:
                try:
                    store.add(f"heartbeat/{rank}", 1)
                except RuntimeError:
                    return  # the store is gone: the job is over
                time.sleep(HEARTBEAT_S)

        threading.Thread(target=beat, name="moetion-heartbeat", daemon=True).start()


def serve_store(port: int = 0) -> tuple[mp.process.BaseProcess, int]:
    """Starts the control store in a forked process of its own, on ``port`` (0: any free one) of
    every interface; returns (process, port).

    A process of its own, not a thread of the supervisor: the supervisor forks replacements later,
    and forking while a store's server thread runs crashes the child.
    """
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_store_main, args=(port, sender), name="moetion-control-store", daemon=True)
    process.start()
    sender.close()
    port = receiver.recv()
    receiver.close()
    return process, port


def _store_main(port: int, port_pipe: Any) -> None:
    store = dist.TCPStore("0.0.0.0", port, 1, is_master=True, wait_for_workers=False)
    port_pipe.send(store.port)
    port_pipe.close()
    parent = os.getppid()
    while os.getppid() == parent:  # serve until the supervisor exits or terminates this process
        time.sleep(0.2)
