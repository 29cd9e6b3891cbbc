"""Data addressable by (iteration, micro-batch), so any stage can re-read its inputs and labels.

``micro_batch(iteration, index)`` must return the same tensors whenever it is asked, in any process.
``index`` is the global micro-batch index of the iteration: replica ``r`` of a data-parallel run
reads indices ``r*M .. r*M+M-1``.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from moetion.errors import DataError
from moetion.random import DOMAIN_DATA, derive_seed

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class DataSource(Protocol):
    def micro_batch(self, iteration: int, index: int) -> Batch:
        """Inputs and labels of one micro-batch; the same on every call and in every process."""
        ...


def read_micro_batch(data: DataSource, iteration: int, index: int) -> Batch:
    """``data.micro_batch(iteration, index)``, any failure of the source a :class:`DataError` naming both."""
    try:
        return data.micro_batch(iteration, index)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"data source failed for iteration {iteration}, micro-batch {index}: {error}") from error


def stdlib_corpus(*, max_bytes: int = 4 << 20) -> bytes:
    """Python source text every machine already has: the standard library's ``.py`` files.

    Files are read in sorted order, so one interpreter version always yields the same bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if not corpus:
        raise DataError(f"no Python source found under {root} to build the demo corpus from")
    return corpus


class ByteCorpus:
    """Byte-level language-model samples: random windows of a corpus, tokens are byte values.

    The window offsets of (iteration, index) come from a generator seeded by exactly those numbers,
    so every (iteration, micro-batch) is valid and reproducible forever, with no epoch state.
    """

    def __init__(self, corpus: bytes, *, seq_len: int, micro_batch_size: int, seed: int = 0) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if len(corpus) < seq_len + 1:
            raise DataError(f"corpus of {len(corpus)} bytes is too short for samples of {seq_len + 1} bytes")
        self.tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed

    def micro_batch(self, iteration: int, index: int) -> Batch:
        if iteration < 0 or index < 0:
            raise DataError(f"(iteration, micro-batch) must be >= 0, got ({iteration}, {index})")
        gen = torch.Generator().manual_seed(derive_seed(DOMAIN_DATA, self.seed, iteration, index))
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (self.micro_batch_size,), generator=gen)
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


class TensorDataSource:
    """A finite data set held in tensors: iteration ``t`` uses rows ``t*rows_per_iteration ...``.

    ``rows_per_iteration = micro_batches_per_iteration * micro_batch_size``. Asking past the end
    is a :class:`DataError` naming how many iterations the data holds.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        micro_batch_size: int,
        micro_batches_per_iteration: int,
    ) -> None:
        if len(inputs) != len(labels):
            raise DataError(f"inputs have {len(inputs)} rows but labels {len(labels)}")
        if micro_batch_size < 1 or micro_batches_per_iteration < 1:
            raise DataError("micro_batch_size and micro_batches_per_iteration must be >= 1")
        self.inputs, self.labels = inputs, labels
        self.micro_batch_size = micro_batch_size
        self.micro_batches_per_iteration = micro_batches_per_iteration

    @property
    def num_iterations(self) -> int:
        return len(self.inputs) // (self.micro_batch_size * self.micro_batches_per_iteration)

    def micro_batch(self, iteration: int, index: int) -> Batch:
        if not 0 <= index < self.micro_batches_per_iteration:
            raise DataError(
                f"micro-batch index {index} outside 0..{self.micro_batches_per_iteration - 1}: the data "
                "source was built for fewer micro-batches per iteration than the engine uses"
            )
        if not 0 <= iteration < self.num_iterations:
            raise DataError(
                f"the data holds {self.num_iterations} iterations of {self.micro_batches_per_iteration} "
                f"micro-batches x {self.micro_batch_size} rows; iteration {iteration} was requested"
            )
        start = (iteration * self.micro_batches_per_iteration + index) * self.micro_batch_size
        return self.inputs[start : start + self.micro_batch_size], self.labels[start : start + self.micro_batch_size]
