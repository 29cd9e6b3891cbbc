"""Prefetching hands over exactly the wrapped source's micro-batches, reads ahead, and stays bounded."""
import threading

import pytest
import torch

from moetion import DataError
from moetion.prefetch import PrefetchingSource


class Slow:
    """Micro-batch (t, i) is a tensor naming it; records what was read."""

    def __init__(self):
        self.read = []
        self.lock = threading.Lock()

    def micro_batch(self, iteration, index):
        with self.lock:
            self.read.append((iteration, index))
        return torch.tensor([iteration, index]), torch.tensor([index])


def test_same_batches_in_the_stage_order_read_ahead_and_bounded():
    slow = Slow()
    source = PrefetchingSource(slow, micro_batches=2, depth=3)
    try:
        # Replica 1 of 2: global indices 2 and 3 of each iteration.
        for t in range(4):
            for i in (2, 3):
                x, y = source.micro_batch(t, i)
                assert x.tolist() == [t, i] and y.tolist() == [i]
        assert (4, 2) in slow.read or (3, 3) in slow.read, "it read ahead of the stage"
        assert len(source.queued) <= 3
        assert source.requests == 8
        # A jump (a re-run after recovery) is served exactly, and the stale read-ahead dropped.
        assert source.micro_batch(1, 3)[0].tolist() == [1, 3]
        assert set(source.queued) == {(2, 2), (2, 3), (3, 2)}
    finally:
        source.close()


def test_errors_of_the_source_reach_the_training_thread():
    class Broken:
        def micro_batch(self, iteration, index):
            raise DataError(f"no data for ({iteration}, {index})")

    source = PrefetchingSource(Broken(), micro_batches=2)
    try:
        with pytest.raises(DataError, match=r"no data for \(0, 0\)"):
            source.micro_batch(0, 0)
        with pytest.raises(DataError, match=r"no data for \(0, 1\)"):
            source.micro_batch(0, 1)
    finally:
        source.close()
