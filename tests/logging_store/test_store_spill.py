"""Memory budget and spilling: nothing is lost, accounting stays exact, files are cleaned up."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from logstore_helpers import assert_exact_accounting, random_tensor, same_bits, smooth_tensor

import logging_store as ls
from logging_store import LogKey, LogStore

SMALL = {"reserve_bytes": 0, "headroom_bytes": 0, "chunk_bytes": 1 << 16}


def _key(iteration: int, micro_batch: int = 0) -> LogKey:
    return LogKey(iteration, micro_batch, "gradient", 0)


def _spill_files(store: LogStore) -> list[Path]:
    path = store._spill_dir.path  # the store's private directory under spill_dir
    return sorted(path.iterdir()) if path is not None else []


def test_synchronous_spill_keeps_resident_bytes_within_budget(tmp_path: Path) -> None:
    budget = 300_000
    with LogStore(workers=0, budget_bytes=budget, spill_dir=tmp_path, **SMALL) as store:
        tensors = {}
        for i in range(30):
            key = _key(i // 3, i % 3)
            tensors[key] = random_tensor(torch.float32, (100 + 7 * i, 97), seed=i)
            store.put(key, tensors[key])
            assert store.stats().resident_bytes <= budget
        stats = assert_exact_accounting(store, tensors)
        assert stats.spilled_entries > 0 and stats.spilled_total == stats.spilled_entries
        # Nothing dropped since: the segment files hold exactly the spilled frames.
        assert sum(f.stat().st_size for f in _spill_files(store)) == stats.spilled_bytes
        for key, tensor in tensors.items():
            assert same_bits(store.get(key), tensor)
        oldest = store.describe(_key(0))  # spilled first, so its exported frame is the bytes on disk
        assert oldest.state is ls.EntryState.SPILLED
        assert same_bits(ls.decode(store.export(0, 1)[: oldest.stored_bytes]), tensors[_key(0)])


def test_background_spill_and_compression_together(tmp_path: Path) -> None:
    budget = 400_000
    with LogStore(codec="zstd", workers=2, budget_bytes=budget, spill_watermark=0.5, spill_dir=tmp_path,
                  **SMALL) as store:
        tensors = {}
        for i in range(40):
            key = _key(i)
            tensors[key] = smooth_tensor(torch.bfloat16, (50, 300 + i), seed=i)
            store.put(key, tensors[key])
        assert store.wait_idle(timeout=60)
        stats = assert_exact_accounting(store, tensors)
        assert stats.resident_bytes <= budget * 0.5 and stats.spilled_entries > 0
        assert stats.spilled_entries + stats.encoded_entries == 40
        for key, tensor in tensors.items():
            assert same_bits(store.get(key), tensor)
        exported = store.export()
    with LogStore(workers=0, **SMALL) as copy:
        copy.import_(exported)
        for key, tensor in tensors.items():
            assert same_bits(copy.get(key), tensor)


def test_entry_larger_than_budget_goes_straight_to_disk(tmp_path: Path) -> None:
    with LogStore(workers=0, budget_bytes=10_000, spill_dir=tmp_path, **SMALL) as store:
        small = torch.arange(100, dtype=torch.int64)
        big = random_tensor(torch.float16, (100, 200), seed=3)
        store.put(_key(0), small)
        store.put(_key(1), big.T)
        assert store.describe(_key(1)).state is ls.EntryState.SPILLED
        assert store.describe(_key(0)).state is ls.EntryState.RAW
        assert same_bits(store.get(_key(1)), big.T.contiguous())
        assert_exact_accounting(store, {_key(0): small, _key(1): big})


def test_drop_deletes_segments_and_close_removes_the_directory(tmp_path: Path) -> None:
    store = LogStore(workers=0, budget_bytes=50_000, spill_dir=tmp_path, **SMALL)
    tensors = {}
    for i in range(12):
        tensors[_key(i)] = random_tensor(torch.int64, (2000,), seed=i)
        store.put(_key(i), tensors[_key(i)])
    files_before = _spill_files(store)
    assert len(files_before) >= 3
    store.drop_before(6)
    for i in range(6):
        del tensors[_key(i)]
    assert len(_spill_files(store)) < len(files_before)
    assert_exact_accounting(store, tensors)
    for key, tensor in tensors.items():
        assert same_bits(store.get(key), tensor)
    store.drop_before(100)
    assert _spill_files(store) == [] and store.stats().stored_bytes == 0
    directory = store._spill_dir.path
    store.close()
    assert not directory.exists() and list(tmp_path.iterdir()) == []


def test_damaged_spill_file_is_reported_not_returned(tmp_path: Path) -> None:
    with LogStore(workers=0, budget_bytes=20_000, spill_dir=tmp_path, **SMALL) as store:
        for i in range(4):
            store.put(_key(i), torch.full((2000,), float(i)))
        assert store.describe(_key(0)).state is ls.EntryState.SPILLED
        segment = _spill_files(store)[0]
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0x10
        segment.write_bytes(bytes(data))
        with pytest.raises(ls.CorruptFrameError):
            store.get(_key(0))
        with pytest.raises(ls.CorruptFrameError):
            store.export(0, 1)
        segment.write_bytes(bytes(data[:100]))
        with pytest.raises(ls.SpillError, match="truncated"):
            store.get(_key(0))


def test_spill_failure_raises_and_loses_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the spill directory should go")
    with LogStore(workers=0, budget_bytes=10_000, spill_dir=blocker, **SMALL) as store:
        first = torch.arange(2000, dtype=torch.int32)
        store.put(_key(0), first)
        with pytest.raises(ls.SpillError, match="spill directory"):
            store.put(_key(1), torch.zeros(2000, dtype=torch.int32))
        assert store.keys() == [_key(0)] and torch.equal(store.get(_key(0)), first)
        assert_exact_accounting(store, {_key(0): first})
