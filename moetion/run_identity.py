"""Whose files are these: the run id (a directory name under the shared-memory and persist roots)
and the job nonce (which job of that run captured a window).

A run id names a run across restarts; a job nonce names one start of it. A fresh job gets a new
nonce; ``--resume`` continues the run and takes the nonce recorded in its ``config.json``. Windows
carry both, so a job never adopts or prunes another job's windows, even under a reused run id.

Both are derived from the job secret when there is one (every rank and replacement of a job gets
the same values; nobody else can predict them). A plain ``torchrun`` job has no secret: the values
then come from torchrun's rendezvous id (random under ``--standalone``) and the master address.
"""
from __future__ import annotations

import hashlib
import re

from moetion import env
from moetion.errors import ConfigError
from moetion.job_secret import derive, secret_from_env

_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_run_id(value: str, *, what: str = "snapshot.run_id") -> str:
    """``value`` if it is a safe single directory name: [A-Za-z0-9._-], 1-128 characters, not ``.``/``..``."""
    if not isinstance(value, str) or not _RUN_ID.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{what} must be 1-128 characters of [A-Za-z0-9._-] and not '.' or '..' (a plain directory "
                          f"name), got {value!r:.80}")
    return value


def default_run_id() -> str:
    """The run id of a job that does not set one: unpredictable, the same on every rank."""
    return "job-" + _job_value("run-id")[:16]


def fresh_job_nonce() -> str:
    """This job's nonce, if it starts a run afresh (the same on every rank and replacement)."""
    return _job_value("job-nonce")[:32]


def resume_requested() -> bool:
    """True when the job was started to resume (``moetion launch --resume``, or ``MOETION_RESUME=1``
    under torchrun): the script should then call ``engine.load_checkpoint(data)`` before training."""
    return env.resume_requested()


def _job_value(purpose: str) -> str:
    secret = secret_from_env()
    if secret is not None:
        return derive(secret, purpose).hex()
    parts = env.elastic_identity()
    return hashlib.sha256("|".join([purpose, *parts]).encode()).hexdigest()
