"""The default intra-op thread count: the host's cores shared among its ranks, one core left for
moetion's own threads when the ranks' teams would fill them all."""
import os

import pytest

from moetion.threads import default_threads


@pytest.mark.parametrize("cores, ranks, expected", [
    (2, 1, 1),   # 2 threads would fill the host: 1, a core left for the capture and log threads
    (2, 4, 1),   # oversubscribed already: one thread each, never zero
    (16, 4, 3),
    (10, 4, 2),  # 2 cores stay free anyway
    (64, 8, 7),
    (1, 1, 1),
])
def test_default_threads_leave_a_core_free_only_when_the_teams_would_fill_the_host(monkeypatch, cores, ranks,
                                                                                    expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_threads(ranks) == expected
