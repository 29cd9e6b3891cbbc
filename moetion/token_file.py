"""The common pre-training format: a flat binary file of token ids, read through ``np.memmap``.

The file is never loaded whole: a window of ``seq_len + 1`` tokens is read when a micro-batch asks
for it, so a file larger than memory works. Windows start every ``stride`` tokens; their seeded
order per epoch comes from :class:`~moetion.dataset_source.DatasetSource`, so a token file is
addressable by ``(iteration, index)`` exactly like any other data source.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moetion.dataset_source import DatasetSource
from moetion.errors import DataError

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class TokenWindows(Dataset):
    """Item ``i``: tokens ``[i*stride, i*stride + seq_len]`` as ``(inputs, labels)`` int64 tensors
    (labels are the inputs shifted by one)."""

    def __init__(self, path: str | Path, *, dtype: str, seq_len: int, stride: int | None = None) -> None:
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"token dtype must be one of {sorted(TOKEN_DTYPES)}, got {dtype!r}")
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise DataError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
        path = Path(path)
        width = np.dtype(TOKEN_DTYPES[dtype]).itemsize
        size = path.stat().st_size
        if size % width:
            raise DataError(f"token file {path} has {size} bytes, not a multiple of the {width}-byte {dtype} "
                            "token width: wrong dtype, or a truncated file")
        tokens = size // width
        if tokens < seq_len + 1:
            raise DataError(f"token file {path} holds {tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.path, self.dtype, self.seq_len, self.stride = path, dtype, seq_len, stride
        self.num_tokens = tokens
        self._tokens = np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r", shape=(tokens,))

    def __len__(self) -> int:
        return (self.num_tokens - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} outside 0..{len(self) - 1}")
        start = i * self.stride
        window = torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


def token_file_source(
    path: str | Path,
    *,
    dtype: str,
    seq_len: int,
    micro_batch_size: int,
    micro_batches_per_iteration: int,
    stride: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> DatasetSource:
    """A data source over the windows of a token file (``stride`` defaults to ``seq_len``: no overlap),
    shuffled per epoch by ``(seed, epoch)``."""
    return DatasetSource(TokenWindows(path, dtype=dtype, seq_len=seq_len, stride=stride),
                         micro_batch_size=micro_batch_size, micro_batches_per_iteration=micro_batches_per_iteration,
                         shuffle=shuffle, seed=seed)
