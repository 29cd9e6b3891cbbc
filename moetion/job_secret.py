"""The job secret: a random value every process of one job shares, and nobody else knows.

The launcher makes one per job (or takes the operator's, for a multi-host job) and hands it to the
ranks only through their environment (``MOETION_JOB_SECRET``): never on a command line (other users
can read those in ``ps``), never in a log line. Everything the job must tell apart from a stranger's
input is derived from it: the key that signs control-store values (:mod:`moetion.signed_store`), the
default run id, and the job nonce that stamps the job's windows on disk.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from moetion import env
from moetion.errors import ConfigError

MIN_SECRET_CHARS = 32  # 128 bits as hex


def new_secret() -> str:
    """A fresh secret: 256 random bits, as hex (safe to put in an environment variable)."""
    return secrets.token_hex(32)


def check_secret(secret: str) -> str:
    """``secret`` if it is long enough to resist guessing; ConfigError (never echoing it) otherwise."""
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
        raise ConfigError(f"{env.JOB_SECRET} must be at least {MIN_SECRET_CHARS} characters of random text, got "
                          f"{len(secret) if isinstance(secret, str) else type(secret).__name__} characters; "
                          "generate one with `python -c 'import secrets; print(secrets.token_hex(32))'`")
    return secret


def secret_from_env() -> str | None:
    """The job's secret from this process's environment, checked; None when the job has none
    (a plain ``torchrun`` job: no moetion control store to protect)."""
    value = env.job_secret()
    return None if value is None else check_secret(value)


def derive(secret: str, purpose: str) -> bytes:
    """A 32-byte value for one ``purpose``: independent of every other purpose's, and of no use
    for recovering the secret."""
    return hmac.new(secret.encode(), b"moetion/" + purpose.encode(), hashlib.sha256).digest()
