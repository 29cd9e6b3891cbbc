"""Shared helpers for the logging_store tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

import numpy as np
import torch

import logging_store as ls

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
SHAPES = [(), (0,), (3, 0, 5), (7,), (33, 65), (2, 3, 4, 5)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaN payloads, -0.0, denormals included), except bool which must be 0/1."""
    generator = np.random.default_rng(seed)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.from_numpy(generator.integers(0, 2, count, dtype=np.uint8)).view(torch.bool).reshape(shape)
    raw = generator.integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def smooth_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Activation-like values (compressible after byte-shuffle)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(shape, generator=generator)).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """dtype, shape and every byte equal (torch.equal would call NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(_bytes(a)) == bytes(_bytes(b))


def _bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return np.empty(0, np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def assert_exact_accounting(store: ls.LogStore, tensors: dict[ls.LogKey, torch.Tensor]) -> ls.StoreStats:
    """Stats equal sums recomputed entry by entry, and the raw total equals the tensors put."""
    stats = store.stats()
    infos = [store.describe(key) for key in store.keys()]
    assert stats.entries == len(infos) == len(tensors)
    assert stats.raw_bytes == sum(t.nbytes for t in tensors.values()) == sum(i.raw_bytes for i in infos)
    by_state = {state: [i for i in infos if i.state is state] for state in ls.EntryState}
    assert (stats.raw_entries, stats.encoded_entries, stats.spilled_entries) == tuple(
        len(by_state[s]) for s in (ls.EntryState.RAW, ls.EntryState.ENCODED, ls.EntryState.SPILLED))
    assert stats.spilled_bytes == sum(i.stored_bytes for i in by_state[ls.EntryState.SPILLED])
    assert stats.resident_bytes == sum(i.stored_bytes for i in infos if i.state is not ls.EntryState.SPILLED)
    assert stats.stored_bytes == stats.resident_bytes + stats.spilled_bytes
    assert all(i.stored_bytes == i.raw_bytes for i in by_state[ls.EntryState.RAW])
    return stats
