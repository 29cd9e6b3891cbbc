"""Host liveness in a multi-host job: each host's supervisor beats, and each watches the others.

Why: when a whole host is lost, its supervisor is gone with it and nothing replaces its ranks. The
ranks of the other hosts would wait for a generation nobody announces, until ``peer_timeout_s``.
A host whose supervisor has not beaten for the heartbeat timeout (and has not finished) is lost.
If a standby host is registered (``moetion launch --standby``), it claims the lost host's node
rank, beats in its name and starts its ranks as replacements in a new generation: the other hosts
see the beats move again and go on. Otherwise (or if no standby claims it within another heartbeat
timeout) the job is ended through the control store's ``fatal`` message, which every waiting rank
checks, and the message names the host and the command that resumes the job from its persisted
windows. Node 0 serves the control store, so only nodes 1.. can be taken over.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from moetion.control import HEARTBEAT_S, ControlPlane

NODE_RANK = "<NODE_RANK>"
STANDBYS_KEY = "standby/available"  # standby hosts registered and not yet used


def takeover_key(node: int) -> str:
    return f"host/{node}/taken-over"


class HostWatch:
    """This host's beat and its view of the other hosts' beats (``host/{n}/beat`` counters)."""

    def __init__(self, control: ControlPlane, *, node_rank: int, nnodes: int, nproc: int, timeout_s: float,
                 resume_command: str) -> None:
        self.control, self.node_rank, self.nnodes, self.nproc = control, node_rank, nnodes, nproc
        self.timeout_s, self.resume_command = timeout_s, resume_command
        self._others = [n for n in range(nnodes) if n != node_rank]
        self._last: dict[int, int] = {}
        self._moved_at = dict.fromkeys(self._others, time.monotonic())
        self._beat_at = 0.0
        self.lost: set[int] = set()

    def lost_host(self) -> str | None:
        """Beats (at most once per heartbeat interval); the fatal message for a lost host, or None."""
        now = time.monotonic()
        if now - self._beat_at < HEARTBEAT_S:
            return None
        self._beat_at = now
        store = self.control.store
        store.add(f"host/{self.node_rank}/beat", 1)
        for node in self._others:
            count = store.add(f"host/{node}/beat", 0)
            if count != self._last.get(node):
                self._last[node], self._moved_at[node] = count, now
            elif count > 0 and self._stalled(node, now) and not self._finished(node):
                self.lost.add(node)
                return self._message(node)
        return None

    def _stalled(self, node: int, now: float) -> bool:
        """Silent past the heartbeat timeout, and past a second one when a standby could take it over
        (its claim, then its first beat in the host's name, need that long at most)."""
        silent = now - self._moved_at[node]
        if silent <= self.timeout_s:
            return False
        return silent > 2 * self.timeout_s or not (node > 0 and standbys_available(self.control))

    def _finished(self, node: int) -> bool:
        return self.control.store.check([f"host/{node}/finished"])

    def _message(self, node: int) -> str:
        first = node * self.nproc
        return (f"host {node} (ranks {first}..{first + self.nproc - 1}) stopped answering: its supervisor sent no "
                f"heartbeat for {self.timeout_s:g} s and no standby host took it over. Resume the job from its "
                f"persisted windows: run on every host its command with --resume, e.g. on host {node}: "
                f"{self.resume_command.replace(NODE_RANK, str(node))}")


def resume_command(*, script: str, script_args: list[str], nproc: int, nnodes: int, master_addr: str,
                   master_port: int) -> str:
    """The ``moetion launch --resume`` command of host ``NODE_RANK`` (replaced per host)."""
    args = " ".join([script, *script_args])
    return (f"moetion launch --resume --nproc {nproc} --nnodes {nnodes} --node-rank {NODE_RANK} "
            f"--master-addr {master_addr} --master-port {master_port} {args}")


def standbys_available(control: ControlPlane) -> bool:
    return control.store.add(STANDBYS_KEY, 0) > 0


class StandbyWatch:
    """A standby host's view of the job: waits until a host (node >= 1) stops beating, then claims
    its node rank; at most one standby wins each host."""

    def __init__(self, control: ControlPlane, *, nnodes: int, timeout_s: float) -> None:
        self.control, self.nnodes, self.timeout_s = control, nnodes, timeout_s
        self._last: dict[int, int] = {}
        self._moved_at: dict[int, float] = {}

    def wait_for_lost_host(self, *, progress: Callable[[str], None]) -> int | None:
        """The node rank this standby took over, or None once the job finished or failed without it."""
        store = self.control.store
        store.add(STANDBYS_KEY, 1)
        progress(f"standby for hosts 1..{self.nnodes - 1}: watching their heartbeats")
        while True:
            if self.control.fatal() is not None or self.control.hosts_finished(self.nnodes):
                store.add(STANDBYS_KEY, -1)
                return None
            now = time.monotonic()
            for node in range(1, self.nnodes):
                count = store.add(f"host/{node}/beat", 0)
                if count != self._last.get(node):
                    self._last[node], self._moved_at[node] = count, now
                elif count > 0 and now - self._moved_at[node] > self.timeout_s and not self._finished(node):
                    if self._claim(node):
                        store.add(STANDBYS_KEY, -1)
                        return node
            time.sleep(HEARTBEAT_S / 2)

    def _claim(self, node: int) -> bool:
        return self.control.store.add(takeover_key(node), 1) == 1  # the first to count wins

    def _finished(self, node: int) -> bool:
        return self.control.store.check([f"host/{node}/finished"])
