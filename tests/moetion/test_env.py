"""The process environment is read in one module, parsed strictly: a malformed value is an error
naming the variable, never a silent default."""
import pytest

from moetion import env
from moetion.errors import ConfigError


@pytest.mark.parametrize("value", ["true", "yes", "false", "2", " 1"])
def test_a_flag_is_one_or_zero(monkeypatch, value):
    monkeypatch.setenv(env.RESUME, value)
    with pytest.raises(ConfigError, match=f"{env.RESUME} must be 1 or 0, got {value!r}"):
        env.resume_requested()


def test_flags_read_as_documented(monkeypatch):
    monkeypatch.delenv(env.FAILURE_NOTICE, raising=False)
    monkeypatch.setenv(env.RESUME, "1")
    assert env.resume_requested() and env.failure_notice_enabled()
    monkeypatch.setenv(env.FAILURE_NOTICE, "0")
    assert not env.failure_notice_enabled()


def test_rank_variables_are_checked(monkeypatch):
    for name, value in [(env.RANK, "1"), (env.WORLD_SIZE, "4"), (env.MASTER_ADDR, "127.0.0.1"),
                        (env.MASTER_PORT, "29500")]:
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(env.LOCAL_WORLD_SIZE, raising=False)
    monkeypatch.delenv(env.LOCAL_RANK, raising=False)
    where = env.rank_env()
    assert (where.rank, where.world_size, where.local_rank, where.local_world_size) == (1, 4, 0, 4)
    monkeypatch.setenv(env.RANK, "-1")
    with pytest.raises(ConfigError, match="RANK must be an integer >= 0, got '-1'"):
        env.rank_env()
    monkeypatch.delenv(env.MASTER_PORT)
    with pytest.raises(ConfigError, match="MASTER_PORT not set"):
        env.rank_env()


def test_seconds_must_be_a_number(monkeypatch):
    monkeypatch.setenv(env.JOB_TIMEOUT_S, "soon")
    with pytest.raises(ConfigError, match="MOETION_JOB_TIMEOUT_S must be a number of seconds, got 'soon'"):
        env.seconds(env.JOB_TIMEOUT_S)


def test_no_other_module_reads_the_environment():
    """Writers (launcher, spare pool) may set variables; only moetion.env reads them."""
    import pathlib
    import re

    import moetion
    root = pathlib.Path(moetion.__file__).parent
    reads = re.compile(r"os\.environ(\.get|\[|\.copy)|os\.getenv|in os\.environ")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "env.py" and reads.search(p.read_text())]
    assert offenders == []


def test_device_mode_picks_backend_and_device(monkeypatch):
    import torch

    from moetion.distributed import placement

    monkeypatch.setenv(env.DEVICE, "gpu")
    with pytest.raises(ConfigError, match=r"MOETION_DEVICE must be one of auto, cpu, cuda, cuda-shared, got 'gpu'"):
        placement(local_rank=0)
    monkeypatch.setenv(env.DEVICE, "cpu")
    assert placement(local_rank=3) == ("gloo", torch.device("cpu"))
    monkeypatch.delenv(env.DEVICE)
    if torch.cuda.is_available():
        assert placement(local_rank=0) == ("nccl", torch.device("cuda", 0))
        monkeypatch.setenv(env.DEVICE, "cuda-shared")
        assert placement(local_rank=3) == ("gloo", torch.device("cuda", 0))  # every rank on GPU 0
    else:
        assert placement(local_rank=0) == ("gloo", torch.device("cpu"))
        monkeypatch.setenv(env.DEVICE, "cuda-shared")
        with pytest.raises(ConfigError, match="MOETION_DEVICE=cuda-shared needs a CUDA device"):
            placement(local_rank=0)
