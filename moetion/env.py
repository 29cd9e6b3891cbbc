"""The one module that reads the process environment: the variables torchrun (or ``moetion launch``)
sets for a rank, and moetion's own ``MOETION_*`` variables. Every other module receives values
from these functions, so what a process depends on from outside is listed here, parsed once and
checked: a malformed value is a :class:`ConfigError` naming the variable, never a silent default
(``MOETION_RESUME=true`` is not "1", and is refused rather than ignored).

Writers (the launcher, the harness, the spare pool) use the names below to build children's
environments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from moetion.errors import ConfigError

# -- torchrun's variables ------------------------------------------------------------------------
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
ELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
RENDEZVOUS = (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)

# -- moetion's own ----------------------------------------------------------------------------------
GENERATION = "MOETION_GENERATION"  # the generation a process was started into
SUPERVISED = "MOETION_SUPERVISED"  # "1": a supervisor will replace dead ranks
JOB_SECRET = "MOETION_JOB_SECRET"  # signs the control store; the environment only, never argv or a log
RUN_ID = "MOETION_RUN_ID"  # the run's name in shared memory and on disk
RESUME = "MOETION_RESUME"  # "1": this job continues a persisted run (``moetion launch --resume``)
LOG_LEVEL = "MOETION_LOG_LEVEL"
KILLS = "MOETION_KILL"  # armed kill specs, ";"-separated (see moetion.faults)
FAULT_LOG = "MOETION_FAULT_LOG"  # where fired kills are recorded
FAILURE_NOTICE = "MOETION_FAILURE_NOTICE"  # "0": no notice thread (benchmark A/B and negative controls only)
HARNESS_OUT = "MOETION_HARNESS_OUT"  # where a rank under the fault harness leaves its final state
HEARTBEAT_TIMEOUT_S = "MOETION_HEARTBEAT_TIMEOUT_S"
JOB_TIMEOUT_S = "MOETION_JOB_TIMEOUT_S"
DEVICE = "MOETION_DEVICE"  # where ranks compute and how they talk (DEVICE_MODES; unset: auto)

# cpu: CPU and gloo. cuda: GPU LOCAL_RANK and NCCL. cuda-shared: every rank on GPU 0, talking over
# gloo (a testing mode: NCCL needs a GPU per rank). auto: cuda where a GPU is, else cpu.
DEVICE_MODES = ("auto", "cpu", "cuda", "cuda-shared")

_FLAGS = {"1": True, "0": False}


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in the job, as torchrun describes it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def has_rendezvous() -> bool:
    return all(name in os.environ for name in RENDEZVOUS)


def missing_rendezvous() -> list[str]:
    return [name for name in RENDEZVOUS if name not in os.environ]


def rank_env() -> RankEnv:
    """This rank's torchrun variables; a ConfigError names any missing or malformed one."""
    missing = missing_rendezvous()
    if missing:
        raise ConfigError(f"not started by a launcher: {', '.join(missing)} not set (run under `moetion launch` "
                          "or torchrun)")
    world = _int(WORLD_SIZE, minimum=1)
    return RankEnv(rank=_int(RANK, minimum=0), world_size=world, local_rank=_int(LOCAL_RANK, default=0, minimum=0),
                   local_world_size=_int(LOCAL_WORLD_SIZE, default=world, minimum=1),
                   master_addr=os.environ[MASTER_ADDR], master_port=_int(MASTER_PORT, minimum=0))


def rank_or_none() -> int | None:
    """This process's rank, or None outside a launched job (e.g. a fault record of a tool)."""
    return _int(RANK, minimum=0) if RANK in os.environ else None


def world_size_or_none() -> int | None:
    return _int(WORLD_SIZE, minimum=1) if WORLD_SIZE in os.environ else None


def elastic_identity() -> tuple[str, str, str]:
    """What tells one torchrun job from another on the same hosts (empty where unset)."""
    return tuple(os.environ.get(name, "") for name in (ELASTIC_RUN_ID, MASTER_ADDR, MASTER_PORT))


def supervised() -> bool:
    return _flag(SUPERVISED, default=False)


def start_generation() -> int:
    return _int(GENERATION, default=0, minimum=0)


def job_secret() -> str | None:
    return os.environ.get(JOB_SECRET)


def run_id() -> str | None:
    return os.environ.get(RUN_ID) or None


def resume_requested() -> bool:
    return _flag(RESUME, default=False)


def log_level() -> str:
    return os.environ.get(LOG_LEVEL, "INFO").upper()


def armed_kills() -> str:
    """The raw kill specs armed in this process ('' when none)."""
    return os.environ.get(KILLS, "")


def fault_log() -> str | None:
    return os.environ.get(FAULT_LOG) or None


def failure_notice_enabled() -> bool:
    return _flag(FAILURE_NOTICE, default=True)


def cublas_workspace() -> str | None:
    """``CUBLAS_WORKSPACE_CONFIG`` (cuBLAS reads it when CUDA makes its handles), None when unset."""
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def device_mode() -> str:
    value = os.environ.get(DEVICE) or "auto"
    if value not in DEVICE_MODES:
        raise ConfigError(f"{DEVICE} must be one of {', '.join(DEVICE_MODES)}, got {value!r}")
    return value


def harness_out() -> str | None:
    return os.environ.get(HARNESS_OUT) or None


def seconds(name: str) -> float | None:
    """A ``*_S`` variable as seconds, or None when unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None


def _flag(name: str, *, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value not in _FLAGS:
        raise ConfigError(f"{name} must be 1 or 0, got {value!r}")
    return _FLAGS[value]


def _int(name: str, *, default: int | None = None, minimum: int) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"{name} is not set")
        return default
    if not value.strip().isdigit() or int(value) < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
