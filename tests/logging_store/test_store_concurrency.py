"""Concurrent put/get/drop/export from several threads while workers compress and spill."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from logstore_helpers import assert_exact_accounting, same_bits, smooth_tensor

import logging_store as ls
from logging_store import LogKey, LogStore

THREADS = 4
ITERATIONS = 30


def _tensor(key: LogKey) -> torch.Tensor:
    """Deterministic per key, so any thread can check any entry; sizes straddle chunk boundaries."""
    rows = 8 + (key.iteration * 7 + key.peer * 13) % 40
    dtype = (torch.bfloat16, torch.float32, torch.float16)[key.peer % 3]
    return smooth_tensor(dtype, (rows, 700), seed=key.iteration * 100 + key.peer)


def test_concurrent_put_get_drop_with_compression_and_spill(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    store = LogStore(codec="zstd", workers=2, budget_bytes=1_500_000, spill_watermark=0.6, spill_dir=tmp_path,
                     reserve_bytes=0, headroom_bytes=1 << 16, chunk_bytes=1 << 16)
    dropped_below = [0]
    last_put = [-1] * THREADS  # per peer; updated after put returns
    progress = threading.Barrier(THREADS)

    def producer(peer: int) -> None:
        try:
            for iteration in range(ITERATIONS):
                key = LogKey(iteration, 0, "activation", peer)
                store.put(key, _tensor(key))
                last_put[peer] = iteration
                # Read back something recent and something older (maybe encoded, spilled or dropped).
                for probe in (key, LogKey(max(0, iteration - 5), 0, "activation", (peer + 1) % THREADS)):
                    try:
                        assert same_bits(store.get(probe), _tensor(probe)), probe
                    except ls.MissingKeyError:  # legitimate only if dropped, or not put yet by its thread
                        assert probe.iteration < dropped_below[0] or last_put[probe.peer] < probe.iteration, probe
                if peer == 0 and iteration % 8 == 7:
                    dropped_below[0] = iteration - 6
                    store.drop_before(dropped_below[0])
                if iteration % 10 == 9:
                    progress.wait(timeout=60)
                    assert store.export(iteration - 2, iteration)  # export while others write
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            progress.abort()

    threads = [threading.Thread(target=producer, args=(peer,)) for peer in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert not errors, errors
        assert not any(thread.is_alive() for thread in threads)
        assert store.wait_idle(timeout=60)
        survivors = {key: _tensor(key) for key in store.keys()}
        assert {k.iteration for k in survivors} == set(range(dropped_below[0], ITERATIONS))
        assert len(survivors) == THREADS * (ITERATIONS - dropped_below[0])
        stats = assert_exact_accounting(store, survivors)
        assert stats.spilled_total > 0 and stats.compressed_total > 0 and stats.raw_entries == 0
        for key, tensor in survivors.items():
            assert same_bits(store.get(key), tensor)
    finally:
        store.close()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_gets_of_one_entry_while_it_changes_state(tmp_path: Path) -> None:
    """Readers pinned on a raw entry keep valid bytes while a worker encodes it and a spill evicts it."""
    with LogStore(codec="lz4", workers=1, budget_bytes=600_000, spill_dir=tmp_path, reserve_bytes=0,
                  headroom_bytes=0, chunk_bytes=1 << 16) as store:
        key = LogKey(0, 0, "gradient", 0)
        expected = smooth_tensor(torch.float32, (300, 300), seed=9)
        store.put(key, expected)
        failures: list[BaseException] = []
        stop = threading.Event()

        def reader() -> None:
            try:
                while not stop.is_set():
                    assert same_bits(store.get(key), expected)
            except BaseException as error:  # noqa: BLE001
                failures.append(error)

        readers = [threading.Thread(target=reader) for _ in range(3)]
        for thread in readers:
            thread.start()
        for i in range(1, 12):  # pushes the first entry through encoded into spilled
            store.put(LogKey(i, 0, "gradient", 0), smooth_tensor(torch.float32, (300, 300), seed=i))
        store.wait_idle(timeout=60)
        stop.set()
        for thread in readers:
            thread.join(timeout=60)
        assert not failures, failures
        assert store.describe(key).state is ls.EntryState.SPILLED
        assert same_bits(store.get(key), expected)
