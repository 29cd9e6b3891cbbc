"""The order of moetion's timeouts, checked where each pair first meets.

From shortest to longest, each must be strictly below the next:

1. heartbeat interval (``control.HEARTBEAT_S``): how often a rank bumps its heartbeat;
2. heartbeat timeout (``--heartbeat-timeout``): a rank silent this long is hung and is killed and
   replaced; it must span at least two beats, or a busy rank is killed for a late beat;
3. ``peer_timeout_s`` (config): the last resort of every wait on a peer and of each rank's
   control-store requests. Failures reach waiting ranks through the failure notice; this fires only
   when the control store itself is unreachable. Below the heartbeat timeout it would fire
   first on a hung rank's neighbours, before the supervisor can replace the rank;
4. the job timeout (``moetion launch --timeout``, the fault harness's per-run timeout): the whole
   job's budget. Below ``peer_timeout_s`` it kills the job before any wait can say what it waited for.

The supervisor knows (1), (2) and (4); a rank knows (3). The supervisor checks its own pairs and
hands (2) and (4) to the ranks in their environment, where :func:`check_rank` checks the rest, so
a broken order is a :class:`~moetion.errors.ConfigError` naming both values, before training starts.
"""
from __future__ import annotations


from moetion import env
from moetion.control import HEARTBEAT_S
from moetion.errors import ConfigError

MIN_BEATS = 2  # heartbeats a heartbeat timeout must span


def check_supervisor(*, heartbeat_timeout_s: float, job_timeout_s: float | None) -> None:
    """The supervisor's pairs: heartbeat interval < heartbeat timeout < job timeout."""
    if heartbeat_timeout_s < MIN_BEATS * HEARTBEAT_S:
        raise ConfigError(
            f"heartbeat timeout ({heartbeat_timeout_s:g} s) must span at least {MIN_BEATS} heartbeats "
            f"(interval {HEARTBEAT_S:g} s): raise --heartbeat-timeout to >= {MIN_BEATS * HEARTBEAT_S:g}"
        )
    if job_timeout_s is not None and job_timeout_s <= heartbeat_timeout_s:
        raise ConfigError(
            f"job timeout ({job_timeout_s:g} s) must exceed the heartbeat timeout ({heartbeat_timeout_s:g} s): "
            "raise --timeout or lower --heartbeat-timeout"
        )


def supervisor_env(*, heartbeat_timeout_s: float, job_timeout_s: float | None) -> dict[str, str]:
    """What a rank needs to check its ``peer_timeout_s`` against the supervisor's timeouts."""
    variables = {env.HEARTBEAT_TIMEOUT_S: repr(float(heartbeat_timeout_s))}
    if job_timeout_s is not None:
        variables[env.JOB_TIMEOUT_S] = repr(float(job_timeout_s))
    return variables


def check_rank(*, peer_timeout_s: float) -> None:
    """A supervised rank's pairs: heartbeat timeout < peer_timeout_s < job timeout."""
    heartbeat = env.seconds(env.HEARTBEAT_TIMEOUT_S)
    job = env.seconds(env.JOB_TIMEOUT_S)
    if heartbeat is not None and peer_timeout_s <= heartbeat:
        raise ConfigError(
            f"peer_timeout_s ({peer_timeout_s:g} s) must exceed the supervisor's heartbeat timeout "
            f"({heartbeat:g} s): a hung rank must be replaced before its neighbours give up on it; "
            "raise peer_timeout_s or lower --heartbeat-timeout"
        )
    if job is not None and peer_timeout_s >= job:
        raise ConfigError(
            f"peer_timeout_s ({peer_timeout_s:g} s) must be below the job timeout ({job:g} s): otherwise the "
            "job is killed before a wait can report what it waited for; lower peer_timeout_s or raise --timeout"
        )

