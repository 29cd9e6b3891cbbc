"""Host liveness in a multi-host job: each host's supervisor beats, and each watches the others.

Why: when a whole host is lost, its supervisor is gone with it and nothing replaces its ranks. The
ranks of the other hosts would wait for a generation nobody announces, until ``peer_timeout_s``.
Instead, a host whose supervisor has not beaten for the heartbeat timeout (and has not finished)
is declared lost: the job is ended through the control store's ``fatal`` message, which every
waiting rank checks, and the message names the host and the command that resumes the job from
its persisted windows.
"""
from __future__ import annotations

import time

from moetion.control import HEARTBEAT_S, ControlPlane

NODE_RANK = "<NODE_RANK>"


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
            elif count > 0 and now - self._moved_at[node] > self.timeout_s and not self._finished(node):
                self.lost.add(node)
                return self._message(node)
        return None

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
