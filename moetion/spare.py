"""Warm spares: idle interpreters that already imported torch, moetion and the training script's
imports, each waiting to become a replacement rank.

Why: a replacement that is a fresh interpreter spends seconds importing Python and torch (3-8 s
on a loaded 2-core host) before it can even rejoin; the survivors wait for it. A spare has paid
that already, so the supervisor hands it an :class:`Identity` (the rank's argv and environment)
through its stdin and it runs the script with ``runpy`` semantics: ``__name__ == "__main__"``,
``sys.argv``, the rank's environment, the script's directory first on ``sys.path``.

What a spare pre-imports: ``torch``, ``moetion`` and the modules the script imports at its top
level (found by parsing it, never by running it). Anything else the script does runs after the
identity arrives, so nothing rank-specific happens before. Environment read at import time that
the rank may set differently (torch's intra-op threads, ``OMP_NUM_THREADS``) is applied when the
identity arrives.

A spare that dies while idle is noticed when the supervisor reaches for it (it is then skipped,
and a fresh interpreter or the next spare is used); it was never a rank, so the job never sees it.
A spare whose supervisor dies reads end-of-file and exits. While idle, a spare's process name
(``/proc/<pid>/comm``, what ``ps`` and ``top`` show) is ``moetion-spare``; it takes back the
interpreter's name when it becomes a rank.

Run as ``python -m moetion.spare SCRIPT`` by :class:`SparePool` only.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from moetion import rank_entry
from moetion.proc_name import process_name, set_process_name

MAX_IDENTITY_BYTES = 1 << 20
IDLE_NAME = "moetion-spare"


@dataclass(frozen=True)
class Identity:
    """What turns a spare into a rank: the script's argv and the rank's whole environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]

    def to_bytes(self) -> bytes:
        return json.dumps({"argv": list(self.argv), "env": dict(self.env)}).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Identity":
        values = json.loads(raw)
        argv, env = values["argv"], values["env"]
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)
                and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ValueError("a spare's identity needs argv: [str] and env: {str: str}")
        return cls(tuple(argv), env)


def top_level_imports(script: str) -> list[str]:
    """Modules the script imports at its top level (``import a.b``, ``from a import b``), in order;
    relative imports are skipped."""
    with open(script, "rb") as handle:
        tree = ast.parse(handle.read(), filename=script)
    found: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append(node.module)
    return list(dict.fromkeys(found))


class SparePool:
    """The supervisor's idle interpreters for ``script`` (``count`` of them; 0: none)."""

    def __init__(self, script: str, *, count: int, env: Mapping[str, str]) -> None:
        self.script, self.count, self.env = os.path.abspath(script), count, dict(env)
        self._idle: list[subprocess.Popen] = []
        self.refill()

    def refill(self) -> None:
        """Starts spares until ``count`` are idle (they import in the background)."""
        self._idle = [p for p in self._idle if p.poll() is None]
        while len(self._idle) < self.count:
            self._idle.append(subprocess.Popen([sys.executable, "-m", "moetion.spare", self.script],
                                               stdin=subprocess.PIPE, env=self.env))

    def take(self, identity: Identity) -> subprocess.Popen | None:
        """Hands ``identity`` to a live idle spare and returns it (now that rank), or None when no
        spare is left alive; a replacement spare is started either way."""
        try:
            while self._idle:
                spare = self._idle.pop(0)
                if spare.poll() is not None:
                    continue  # died while idle: never a rank
                try:
                    spare.stdin.write(identity.to_bytes())
                    spare.stdin.close()
                except (BrokenPipeError, ValueError):
                    spare.kill()
                    spare.wait()
                    continue
                return spare
            return None
        finally:
            self.refill()

    def close(self) -> None:
        """Ends the idle spares (the job is over)."""
        for spare in self._idle:
            spare.kill()
            spare.wait()
        self._idle = []


def warm_torch() -> None:
    """The first meta-device op imports torch's reference kernels lazily (~0.9 s here;
    PipelineModule counts parameters on the meta device): pay it before a rank needs it."""
    import torch

    with torch.device("meta"):
        torch.empty(1).mul(2)


def _wait_for_identity(script: str) -> Identity | None:
    raw = sys.stdin.buffer.readline(MAX_IDENTITY_BYTES + 1)
    if not raw:
        return None  # the supervisor is gone or closed the pool
    if len(raw) > MAX_IDENTITY_BYTES:
        raise SystemExit(f"moetion spare for {script}: identity larger than {MAX_IDENTITY_BYTES} bytes")
    return Identity.from_bytes(raw)


def _adopt(identity: Identity) -> None:
    """Becomes the rank: its environment (and what torch read from the environment at import)."""
    import torch

    os.environ.clear()
    os.environ.update(identity.env)
    threads = identity.env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _preimport(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the script will import it again and report the error itself
            continue


def main(argv: Sequence[str]) -> None:
    (script,) = argv
    own_name = process_name()
    set_process_name(IDLE_NAME)
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` would have it
    _preimport(["torch", "moetion", *top_level_imports(script)])
    warm_torch()
    identity = _wait_for_identity(script)
    if identity is None:
        return
    set_process_name(own_name)
    _adopt(identity)
    rank_entry.main(list(identity.argv))


if __name__ == "__main__":
    main(sys.argv[1:])
