"""The timeout hierarchy: heartbeat interval < heartbeat timeout < peer_timeout_s < job timeout."""
import pytest

from moetion.errors import ConfigError
from moetion.timeouts import check_rank, check_supervisor, supervisor_env


def test_an_ordered_hierarchy_passes_on_both_sides(monkeypatch):
    check_supervisor(heartbeat_timeout_s=30, job_timeout_s=900)
    for name, value in supervisor_env(heartbeat_timeout_s=30, job_timeout_s=900).items():
        monkeypatch.setenv(name, value)
    check_rank(peer_timeout_s=600)


@pytest.mark.parametrize("heartbeat, job, named", [
    (1.5, None, ["1.5 s", "interval 1 s"]),
    (30, 20, ["20 s", "30 s"]),
])
def test_the_supervisor_rejects_a_broken_order_naming_both_values(heartbeat, job, named):
    with pytest.raises(ConfigError) as error:
        check_supervisor(heartbeat_timeout_s=heartbeat, job_timeout_s=job)
    assert all(value in str(error.value) for value in named), str(error.value)


@pytest.mark.parametrize("peer, named", [(20, ["(20 s)", "(30 s)"]), (900, ["(900 s)", "(600 s)"])])
def test_a_rank_rejects_a_peer_timeout_out_of_order_naming_both_values(monkeypatch, peer, named):
    for name, value in supervisor_env(heartbeat_timeout_s=30, job_timeout_s=600).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        check_rank(peer_timeout_s=peer)
    assert all(value in str(error.value) for value in named), str(error.value)


def test_an_unsupervised_rank_has_nothing_to_compare_with(monkeypatch):
    for name in supervisor_env(heartbeat_timeout_s=30, job_timeout_s=600):
        monkeypatch.delenv(name, raising=False)
    check_rank(peer_timeout_s=0.5)
