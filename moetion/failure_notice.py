"""The failure notice: a rank learns from the control store that the job is being rebuilt, wherever
it is blocked, and stops waiting at once instead of at ``peer_timeout_s``.

Why: a stage two hops from a dead one may sit in a receive from a live neighbour that has paused;
nothing on its own connections tells it the job is being rebuilt. The supervisor publishes every
new generation with a notice key (``notice/{g}``, see :meth:`ControlPlane.announce_generation`).
Each supervised rank runs one daemon thread that blocks on its wake-up key of the generation after
its own (``wake/{rank}/{g}``, set for every rank with the notice, and by the rank itself when it
exits, so that no thread is left blocked in the store while the interpreter finalizes): a
server-side wait on its own store connection, nothing on the iteration's path, no collective. When the notice appears, the thread shuts down (``shutdown(SHUT_RDWR)``) the TCP
connections of the rank's current process groups, so whatever the training thread, a replication
thread or a transfer is blocked in fails at once with a connection error; the code that turns that
error into a :class:`~moetion.errors.PeerFailure` asks :func:`explain` and reports the notice as the
reason.

Which sockets are the groups': those that appeared in ``/proc/self/fd`` between
:func:`joining` (before the group is formed) and :func:`joined` (after every group is built). The
control store's connections exist before and are never touched. Listening sockets are skipped:
shutting gloo's listener aborts the process (measured), and a listener blocks nobody.

Measured on gloo (torch 2.13, this machine): a receive pending in another thread raises
"Connection closed by peer" ~0.3 ms after the shutdown; the peers live on and the next
generation's group forms normally. A timed-out ``wait()`` or ``abort()`` does neither (see
PLATFORM-NOTES), hence sockets, not the process-group API.

One gap, observed rarely under load: a gloo send that was partly written when its connection
closed is not woken (docs/timeouts-and-spares.md); such a survivor waits out ``peer_timeout_s``,
and the supervisor names it once it is missing from the new generation for its rejoin timeout.

Lifecycle (one instance per process, :func:`start` once): joining(g) -> joined() [armed for g]
-> (notice g' > g: sockets shut, reason kept) -> disarm() before the group is destroyed -> joining(g')...
The lock makes shutting sockets and destroying the group mutually exclusive, so a closed and
reused descriptor is never shut by mistake (each descriptor's inode is also checked).
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from moetion import env
from moetion.control import ControlPlane, wake_key
from moetion.signed_store import ForgedValue

log = logging.getLogger(__name__)

NOTICE_KEY = "notice/{generation}"
# The watcher blocks on the next notice key without a deadline: a TCPStore wait that times out
# leaves the server's late answer in the connection, corrupting the next request. The key it waits
# for always appears (every generation is announced) or the store goes away with the job.
_NO_DEADLINE = timedelta(days=365)
_STOP_JOIN_S = 15.0  # how long exit waits for the watcher to leave its wait (a loaded host is slow)
_FORGED_RETRY_S = 0.1  # how often a notice key holding a forged value is read again
NOTICE_GRACE_S = 2.0  # how long a broken wait waits for the notice that explains it


@dataclass(frozen=True)
class Notice:
    """A newer generation this rank learned of while in ``generation``."""

    generation: int  # the rank's own generation when the notice arrived
    published: int  # the generation the supervisor published
    why: str  # the supervisor's reason, e.g. "rank(s) [0] killed by SIGKILL"
    at: float  # wall-clock time the rank received it
    sockets_shut: int

    @property
    def reason(self) -> str:
        return f"generation {self.published} published ({self.why})"


def notice_key(generation: int) -> str:
    return NOTICE_KEY.format(generation=generation)


class FailureNotice:
    """One rank's watcher; see the module docstring for its lifecycle."""

    def __init__(self, control: ControlPlane, rank: int) -> None:
        self._store = control.connect(timeout=_NO_DEADLINE)  # values are signed with the job secret
        self._control, self._rank = control, rank
        self._stopping = False
        self._waiting: int | None = None  # the generation whose wake-up key the watcher waits on
        self._lock = threading.Lock()
        self._armed = threading.Condition(self._lock)
        self._generation: int | None = None  # armed for this generation, None while not in a group
        self._joining: tuple[int, dict[int, str]] | None = None
        self._sockets: dict[int, str] = {}
        self.notice: Notice | None = None  # the last notice received, kept until the next group is joined
        self._thread = threading.Thread(target=self._watch, name="moetion-failure-notice", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the watcher before the interpreter finalizes: a thread still blocked in the store's
        wait while its C++ objects are torn down aborts the process (SIGABRT instead of the rank's
        own exit status). The rank sets its own wake-up key, so the wait returns at once."""
        with self._lock:
            waiting, self._generation, self._sockets, self._stopping = self._waiting, None, {}, True
            self._armed.notify_all()
        if waiting is not None:
            try:
                # Through the rank's own connection: the watcher's is busy in its wait.
                self._control.store.set(wake_key(self._rank, waiting), "exit")
            except RuntimeError:
                return  # the store is gone, and with it the wait
        self._thread.join(timeout=_STOP_JOIN_S)

    def joining(self, generation: int) -> None:
        """Call right before forming ``generation``'s process group."""
        with self._lock:
            self._joining = (generation, socket_fds())

    def joined(self) -> None:
        """Call once every process group of the generation is built: arms the watcher."""
        with self._lock:
            if self._joining is None:
                return
            generation, before = self._joining
            self._joining = None
            self._sockets = {fd: node for fd, node in socket_fds().items()
                             if before.get(fd) != node and _is_connection(fd)}
            self._generation, self.notice = generation, None
            self._armed.notify_all()

    def disarm(self) -> None:
        """Call before destroying the groups: their descriptors may be reused afterwards."""
        with self._lock:
            self._generation, self._sockets = None, {}

    def explain(self, message: str) -> str:
        """``message`` (a failed wait's cause), led by the notice of the generation that replaces this
        one. A wait broken before the notice arrived (a neighbour died, or shut its connections on
        its own notice first) waits up to ``NOTICE_GRACE_S`` for it: the rank's next step is to wait
        for that generation anyway, so this costs the recovery nothing. (Shutting this rank's own
        connections here too, before the notice, made gloo abort processes later: measured, see
        docs/timeouts-and-spares.md; so only the notice thread shuts connections.)"""
        with self._lock:
            self._armed.wait_for(lambda: self.notice is not None or self._generation is None, timeout=NOTICE_GRACE_S)
            notice = self.notice
        return message if notice is None else f"{notice.reason}; abandoned the wait: {message}"

    def _watch(self) -> None:
        while True:
            with self._lock:
                self._armed.wait_for(lambda: self._generation is not None or self._stopping)
                if self._stopping:
                    return
                generation = self._generation
                self._waiting = generation + 1
            try:
                self._store.wait([wake_key(self._rank, generation + 1)])
                if self._stopping:
                    return
                why = self._verified(notice_key(generation + 1))
            except RuntimeError:
                return  # the store is gone: the job is over
            self._fire(generation, generation + 1, why)

    def _verified(self, key: str) -> str:
        """The supervisor's notice; a value written without the job secret is ignored until the
        supervisor's own overwrites it."""
        while True:
            try:
                return self._store.get(key).decode(errors="replace")
            except ForgedValue as error:
                log.warning("%s; waiting for the supervisor's notice", error)
                time.sleep(_FORGED_RETRY_S)

    def _fire(self, generation: int, published: int, why: str) -> None:
        with self._lock:
            if self._generation != generation:
                return  # the rank left that group meanwhile (and has seen the generation itself)
            shut = sum(_shutdown(fd, node) for fd, node in self._sockets.items())
            tracked = len(self._sockets)
            self.notice = Notice(generation, published, why, time.time(), shut)
            self._generation, self._sockets = None, {}
            self._armed.notify_all()
        log.warning("%s: shut %d of the %d connection(s) of generation %d (the others had closed)",
                    self.notice.reason, shut, tracked, generation)


def socket_fds() -> dict[int, str]:
    """This process's socket descriptors and their inodes (``socket:[N]``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found[int(name)] = target
    return found


def _is_connection(fd: int) -> bool:
    """A TCP connection (not a listener, not a Unix socket)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return (probe.family in (socket.AF_INET, socket.AF_INET6) and probe.type == socket.SOCK_STREAM
                and not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        probe.close()


def _shutdown(fd: int, node: str) -> bool:
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != node:
            return False
        duplicate = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        duplicate.shutdown(socket.SHUT_RDWR)  # acts on the connection, shared with gloo's descriptor
        return True
    except OSError:
        return False  # already closed by the peer
    finally:
        duplicate.close()  # closes only the duplicate


# -- the process's one watcher -------------------------------------------------------------------------
_active: FailureNotice | None = None


def start(control: ControlPlane, rank: int) -> None:
    """Starts this process's watcher (supervised ranks; once). ``MOETION_FAILURE_NOTICE=0`` (:data:`moetion.env.FAILURE_NOTICE`) skips it."""
    global _active
    if _active is None and env.failure_notice_enabled():
        _active = FailureNotice(control, rank)
        atexit.register(_active.stop)


def joining(generation: int) -> None:
    if _active is not None:
        _active.joining(generation)


def joined() -> None:
    if _active is not None:
        _active.joined()


def disarm() -> None:
    if _active is not None:
        _active.disarm()


def explain(message: str) -> str:
    return message if _active is None else _active.explain(message)


def record() -> dict[str, object] | None:
    """The notice that ended this rank's group, for the recovery's events (JSON), or None."""
    notice = received()
    return None if notice is None else {"published": notice.published, "at": notice.at, "why": notice.why,
                                        "sockets_shut": notice.sockets_shut}


def received() -> Notice | None:
    """The notice that ended this rank's current or last group, if one did."""
    return None if _active is None else _active.notice
