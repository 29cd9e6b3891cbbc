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
- ``notice/{g}``: why generation ``g`` was published; each rank's failure-notice thread blocks on
  the key after its own generation (:mod:`moetion.failure_notice`);
- ``fatal``: a message that ends the job: nothing can recover exactly;
- ``events/{g}/{rank}``: what a rank did during the recovery that formed generation ``g`` (JSON),
  read back by the supervisor for the recovery timeline;
- ``host/{n}/finished``: host ``n``'s supervisor is done (node 0 serves the store until all are).

Trust: every value is signed with the job secret (:mod:`moetion.signed_store`) and read
defensively: a value a stranger wrote, or a torn one, is a warning and is ignored, never a traceback
and never an action (a forged ``fatal`` does not end the job, a forged ``generation`` is not
joined, a forged heartbeat does not keep a hung rank alive). The store listens on one address (the
job's ``MASTER_ADDR``: loopback for a one-host job), not on every interface.

Nothing here runs per iteration: ranks touch the store only while joining and recovering, and the
heartbeat thread once a second.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import secrets
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from moetion.errors import ConfigError, MoetionError
from moetion import env
from moetion.job_secret import derive, secret_from_env
from moetion.proc_name import set_process_name
from moetion.recovery.records import RecoveryEvents
from moetion.signed_store import ForgedValue, SignedStore

HEARTBEAT_S = 1.0
HEARTBEAT_STOP_S = 15.0  # how long exit waits for a heartbeat caught in a slow store call
POLL_S = 0.02
MAX_BUMP_ATTEMPTS = 100  # compare-and-set races lost in a row before publishing a generation gives up
_MAX_NOTICE_CHARS = 1000
log = logging.getLogger(__name__)


class JobAborted(MoetionError):
    """The supervisor or another rank declared the job unrecoverable; the message says why."""


def supervised() -> bool:
    return env.supervised()


def start_generation() -> int:
    return env.start_generation()


def wake_key(rank: int, generation: int) -> str:
    """The key ``rank``'s failure-notice watcher waits on while in the generation before ``generation``:
    set by the supervisor for every rank with the notice, or by the rank itself when it exits."""
    return f"wake/{rank}/{generation}"


class ControlPlane:
    """A client of the job's control store (a rank's or a supervisor's view)."""

    def __init__(self, host: str, port: int, *, secret: str, timeout_s: float = 300.0) -> None:
        self.host, self.port = host, port
        self._key = derive(secret, "control-store")
        self.raw = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                 timeout=timedelta(seconds=timeout_s))
        self.store = SignedStore(self.raw, self._key)
        self._generation_seen = 0
        self._warned: set[str] = set()

    @classmethod
    def from_env(cls, *, timeout_s: float = 300.0) -> "ControlPlane":
        secret = secret_from_env()
        if secret is None:
            raise ConfigError(f"{env.JOB_SECRET} is not set: a supervised rank gets the job secret from `moetion launch` "
                              "(on every host of a multi-host job, export the same value before launching)")
        where = env.rank_env()
        return cls(where.master_addr, where.master_port, secret=secret, timeout_s=timeout_s)

    # -- generations ------------------------------------------------------------------------------
    def generation(self) -> int:
        """The newest generation a supervisor published (never less than one seen before: an old
        value written back by a stranger does not move the job backwards)."""
        current = self._signed_int("generation")
        if current is not None:
            self._generation_seen = max(self._generation_seen, current)
        return self._generation_seen

    def new_generation(self) -> int:
        """Supervisor: the next generation's number, atomically (several supervisors may bump at
        once; each gets its own). Survivors join it as soon as it appears."""
        for _ in range(MAX_BUMP_ATTEMPTS):
            raw = self.raw.get("generation") if self.raw.check(["generation"]) else b""
            current = self.generation()
            value = f"{current + 1}:{secrets.token_hex(8)}".encode()  # unique: two bumps never write the same bytes
            desired = self.store.sign("generation", value)
            if self.raw.compare_set("generation", raw, desired) == desired:
                self._generation_seen = current + 1
                return current + 1
        raise JobAborted(f"the control store's generation changed under {MAX_BUMP_ATTEMPTS} attempts to publish the "
                         "next one: is a client without the job secret writing it? Firewall the control-store port")

    def announce_generation(self, why: str, *, world_size: int) -> int:
        """Supervisor: :meth:`new_generation`, plus its failure notice: the reason (``notice/{g}``)
        and every rank's wake-up key (``wake/{rank}/{g}``), on which each rank's watcher of the
        previous generation is blocked (see :mod:`moetion.failure_notice`)."""
        generation = self.new_generation()
        self.store.set(f"notice/{generation}", why[:_MAX_NOTICE_CHARS])
        for rank in range(world_size):
            self.store.set(wake_key(rank, generation), "notice")
        return generation

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

    def arrived(self, generation: int, rank: int) -> bool:
        """Whether ``rank`` has arrived in ``generation`` (see :meth:`arrive`)."""
        return self._signed(f"gen{generation}/arrived/{rank}") is not None

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

    def all_done(self, generation: int, world_size: int) -> bool:
        """Whether every rank has finished training in ``generation`` (see :meth:`wait_done`)."""
        return self._all_signed([f"gen{generation}/done/{r}" for r in range(world_size)])

    def host_finished(self, node_rank: int) -> None:
        """A host's supervisor is done with the store (its ranks exited, its records read)."""
        self.store.set(f"host/{node_rank}/finished", "1")

    def hosts_finished(self, nnodes: int) -> bool:
        return self._all_signed([f"host/{n}/finished" for n in range(nnodes)])

    def hosts_done(self, nodes: list[int]) -> bool:
        """Whether every host in ``nodes`` is done with the store (some hosts of a job may be lost)."""
        return self.store.check([f"host/{n}/finished" for n in nodes])

    def _wait_keys(self, keys: list[str], generation: int, *, timeout_s: float, what: str) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self._all_signed(keys):
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
        """The job-ending message, if a holder of the secret wrote one."""
        value = self._signed("fatal")
        return None if value is None else value.decode(errors="replace")

    def raise_if_fatal(self) -> None:
        message = self.fatal()
        if message is not None:
            raise JobAborted(message)

    # -- records ------------------------------------------------------------------------------------
    def record(self, generation: int, rank: int, events: RecoveryEvents) -> None:
        self.store.set(f"events/{generation}/{rank}", events.to_json())

    def records(self, generation: int, ranks: range) -> dict[int, RecoveryEvents]:
        """Every rank's recovery events of ``generation``; a forged, torn or malformed record is
        skipped with a warning."""
        found = {}
        for rank in ranks:
            value = self._signed(f"events/{generation}/{rank}")
            events = None if value is None else RecoveryEvents.from_json(value)
            if events is not None:
                found[rank] = events
        return found

    # -- the initial state -----------------------------------------------------------------------------
    def record_initial_digest(self, rank: int, value: bytes) -> None:
        """The digest of ``rank``'s stage as first built (see :mod:`moetion.initial_state`)."""
        self.store.set(f"initial/{rank}", value)

    def initial_digest(self, rank: int) -> bytes | None:
        """What :meth:`record_initial_digest` recorded for ``rank``, if signed with the job secret."""
        return self._signed(f"initial/{rank}")

    # -- liveness -------------------------------------------------------------------------------------
    def heartbeats(self, ranks: list[int]) -> dict[int, tuple[int, int] | None]:
        """Each rank's newest heartbeat as (generation its process started in, beats): a replacement's
        beats sort after its predecessor's. None for a rank with no valid heartbeat (none yet, or
        overwritten by a stranger: that is no progress either)."""
        beats = {}
        for rank in ranks:
            value = self._signed(f"heartbeat/{rank}")
            beats[rank] = None if value is None else _parse_beat(value)
            if value is not None and beats[rank] is None:
                self._warn(f"heartbeat/{rank}", f"control-store heartbeat of rank {rank} is malformed; ignoring it")
        return beats

    def connect(self, *, timeout: timedelta | None = None) -> SignedStore:
        """A connection of its own to the job's store, signing and verifying with the job secret
        (for a thread that must not share the caller's connection)."""
        options = {} if timeout is None else {"timeout": timeout}
        return SignedStore(dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False, **options),
                           self._key)

    def start_heartbeat(self, rank: int, generation: int) -> "Heartbeat":
        """Writes ``heartbeat/{rank}`` = (``generation``, beats so far) every second from a daemon
        thread with its own connection, until the interpreter exits."""
        heartbeat = Heartbeat(self.connect(), rank, generation)
        atexit.register(heartbeat.stop)
        return heartbeat

    # -- reading signed values ------------------------------------------------------------------------
    def _signed(self, key: str) -> bytes | None:
        """The value of ``key`` if present and signed with the job secret; a forged one is a warning."""
        try:
            if not self.raw.check([key]):
                return None
            return self.store.get(key)
        except ForgedValue as error:
            self._warn(key, str(error) + "; ignoring it")
            return None

    def _signed_int(self, key: str) -> int | None:
        value = self._signed(key)
        if value is None:
            return None
        head = value.split(b":", 1)[0]
        if not head.isdigit():
            self._warn(key, f"control-store key {key!r} does not start with a number; ignoring it")
            return None
        return int(head)

    def _all_signed(self, keys: list[str]) -> bool:
        return self.raw.check(keys) and all(self._signed(k) is not None for k in keys)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:  # once per key: a stranger must not flood the log either
            self._warned.add(key)
            log.warning("%s", message)


def _parse_beat(value: bytes) -> tuple[int, int] | None:
    generation, sep, count = value.partition(b":")
    if not (sep and generation.isdigit() and count.isdigit()):
        return None
    return int(generation), int(count)


def serve_store(port: int = 0, *, bind: str = "127.0.0.1") -> tuple[mp.process.BaseProcess, int]:
    """Starts the control store in a forked process of its own, listening on ``bind`` only (the
    job's MASTER_ADDR; loopback for a one-host job), port ``port`` (0: any free one); returns
    (process, port).

    A process of its own, not a thread of the supervisor: the supervisor forks replacements later,
    and forking while a store's server thread runs crashes the child.
    """
    context = mp.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_store_main, args=(bind, port, sender), name="moetion-control-store", daemon=True)
    process.start()
    sender.close()
    try:
        status, value = receiver.recv()
    except EOFError:
        status, value = "error", "the control-store process died while starting"
    receiver.close()
    if status != "ok":
        process.join()
        raise ConfigError(f"cannot serve the control store on {bind}:{port}: {value}; pass a --master-addr "
                          "that is one of this host's addresses and a free --master-port")
    return process, value


STORE_PROCESS_NAME = "moetion-store"


def _store_main(bind: str, port: int, port_pipe: Any) -> None:
    set_process_name(STORE_PROCESS_NAME)
    # TCPStore's own server listens on every interface whatever host it is given: hand it a
    # socket already bound to the one address the job needs.
    try:
        listener = _listen(bind, port)
        store = dist.TCPStore(bind, listener.getsockname()[1], 1, is_master=True, wait_for_workers=False,
                              master_listen_fd=listener.fileno())
    except (OSError, RuntimeError) as error:
        port_pipe.send(("error", str(error).splitlines()[0] if str(error) else type(error).__name__))
        port_pipe.close()
        return
    port_pipe.send(("ok", store.port))
    port_pipe.close()
    parent = os.getppid()
    while os.getppid() == parent:  # serve until the supervisor exits or terminates this process
        time.sleep(0.2)


def _listen(address: str, port: int) -> socket.socket:
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(sockaddr)
    listener.listen(socket.SOMAXCONN)
    return listener


class Heartbeat:
    """One rank's heartbeat thread. It is stopped before the interpreter finalizes: a daemon thread
    caught inside a store call while the interpreter tears down aborts the process (SIGABRT in place
    of the rank's own exit status, which the supervisor would take for a failure)."""

    def __init__(self, store: SignedStore, rank: int, generation: int) -> None:
        self._store, self._rank, self._generation = store, rank, generation
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="moetion-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=HEARTBEAT_STOP_S)

    def _beat(self) -> None:
        count = 0
        while not self._stopping.is_set():
            count += 1
            try:
                self._store.set(f"heartbeat/{self._rank}", f"{self._generation}:{count}")
            except RuntimeError:
                return  # the store is gone: the job is over
            self._stopping.wait(HEARTBEAT_S)
