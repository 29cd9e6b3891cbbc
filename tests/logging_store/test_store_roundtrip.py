"""LogStore: put/get is bit-exact in every entry state; queries, drops, export/import, errors."""
from __future__ import annotations

import io
import threading

import pytest
import torch
from logstore_helpers import DTYPES, SHAPES, random_tensor, same_bits, smooth_tensor

import logging_store as ls
from logging_store import LogKey, LogStore

SMALL = {"reserve_bytes": 0, "headroom_bytes": 0, "chunk_bytes": 1 << 16}


def _key(iteration: int, micro_batch: int = 0, kind: str = "activation", peer: int = 1) -> LogKey:
    return LogKey(iteration, micro_batch, kind, peer)


def _fill(store: LogStore) -> dict[LogKey, torch.Tensor]:
    """Every test dtype and shape, plus a multi-chunk tensor and strided inputs."""
    tensors: dict[LogKey, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            tensors[_key(i, j)] = random_tensor(dtype, shape, seed=10 * i + j)
    tensors[_key(9, 0)] = smooth_tensor(torch.bfloat16, (300, 1000), seed=1)  # ~9 chunks of 64 KiB
    big = random_tensor(torch.float32, (200, 300), seed=2)
    tensors[_key(9, 1)] = big.T  # strided, several chunks
    tensors[_key(9, 2)] = big[::7, ::3]  # strided, fits one chunk
    tensors[_key(9, 3)] = torch.randn(3, 4, dtype=torch.complex64).conj()  # lazy conjugate view
    for key, tensor in tensors.items():
        store.put(key, tensor)
    return {key: tensor.resolve_conj().contiguous() for key, tensor in tensors.items()}


def _check_all(store: LogStore, tensors: dict[LogKey, torch.Tensor]) -> None:
    for key, expected in tensors.items():
        got = store.get(key)
        assert got.is_contiguous() and same_bits(got, expected), key


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_round_trip_raw_then_encoded(codec: str, shuffle: bool) -> None:
    with LogStore(codec=codec, shuffle=shuffle, workers=1, **SMALL) as store:
        tensors = _fill(store)
        _check_all(store, tensors)  # whatever mix of raw and encoded the worker reached
        assert store.wait_idle(timeout=30)
        stats = store.stats()
        if codec == "none":
            assert stats.raw_entries == len(tensors) and stats.compressed_total == 0
        else:
            assert stats.encoded_entries == len(tensors) == stats.compressed_total
        _check_all(store, tensors)


def test_without_workers_entries_stay_raw() -> None:
    with LogStore(workers=0, **SMALL) as store:
        tensors = _fill(store)
        assert store.stats().raw_entries == len(tensors)
        assert {store.describe(k).state for k in tensors} == {ls.EntryState.RAW}
        _check_all(store, tensors)


def test_put_copies_so_later_mutation_does_not_leak_in() -> None:
    with LogStore(workers=0, **SMALL) as store:
        x = torch.arange(10.0)
        store.put(_key(0), x)
        x += 1
        assert torch.equal(store.get(_key(0)), torch.arange(10.0))


def test_tensors_that_require_grad_are_logged_by_value(tmp_path) -> None:
    weight = torch.randn(30, 20, requires_grad=True)
    activation = weight * 2  # non-leaf with a grad_fn
    with LogStore(workers=1, budget_bytes=3000, spill_dir=tmp_path, **SMALL) as store:
        store.put(_key(0), activation)  # larger than the budget: written straight to disk
        store.put(_key(1), weight[:5])  # fits: pooled memory
        store.put(_key(2), weight[:5].T)  # strided
        assert store.describe(_key(0)).state is ls.EntryState.SPILLED
        for key, expected in ((_key(0), activation), (_key(1), weight[:5]), (_key(2), weight[:5].T)):
            got = store.get(key)
            assert not got.requires_grad and torch.equal(got, expected.detach())


def test_get_into_out_tensor_and_its_checks() -> None:
    with LogStore(codec="zstd", workers=1, **SMALL) as store:
        x = smooth_tensor(torch.float32, (5, 7))
        store.put(_key(0), x)
        out = torch.empty(5, 7)
        assert store.get(_key(0), out=out) is out and torch.equal(out, x)
        store.wait_idle()
        assert store.get(_key(0), out=out) is out and torch.equal(out, x)
        with pytest.raises(ls.InvalidArgumentError, match="contiguous CPU tensor"):
            store.get(_key(0), out=torch.empty(7, 5).T)
        with pytest.raises(ls.InvalidArgumentError, match="float32"):
            store.get(_key(0), out=torch.empty(5, 7, dtype=torch.float64))


def test_keys_ranges_items_and_drop_before() -> None:
    with LogStore(workers=1, **SMALL) as store:
        for iteration in range(6):
            for micro_batch in (1, 0):
                for kind, peer in (("gradient", 0), ("activation", 2)):
                    store.put(LogKey(iteration, micro_batch, kind, peer), torch.full((3,), float(iteration)))
        assert len(store) == 24 and _key(3, 1, "gradient", 0) in store
        keys = store.keys(2, 4)
        assert keys == sorted(keys) and {k.iteration for k in keys} == {2, 3} and len(keys) == 8
        assert store.keys() == sorted(store.keys()) and len(store.keys(stop=1)) == 4 and len(store.keys(5)) == 4
        assert all(torch.equal(t, torch.full((3,), float(k.iteration))) for k, t in store.items(4, 5))
        assert store.drop_before(3) == 12
        assert min(k.iteration for k in store.keys()) == 3 and len(store) == 12
        with pytest.raises(ls.MissingKeyError, match="drop_before"):
            store.get(_key(2, 0, "activation", 2))
        assert store.drop_before(3) == 0
        store.wait_idle()
        stats = store.stats()
        assert stats.entries == 12 and stats.raw_bytes == 12 * 12


def test_duplicate_missing_and_invalid_inputs() -> None:
    with LogStore(workers=0, **SMALL) as store:
        store.put(_key(1), torch.zeros(2))
        with pytest.raises(ls.DuplicateKeyError, match="already logged"):
            store.put(_key(1), torch.ones(2))
        assert torch.equal(store.get(_key(1)), torch.zeros(2))
        with pytest.raises(ls.MissingKeyError):
            store.get(_key(2))
        with pytest.raises(KeyError):  # MissingKeyError is also a KeyError
            store.describe(_key(2))
        with pytest.raises(ls.InvalidArgumentError, match="LogKey"):
            store.put((1, 0, "activation", 1), torch.zeros(1))
        with pytest.raises(ls.InvalidArgumentError, match="dense"):
            store.put(_key(3), [1.0, 2.0])
        with pytest.raises(ls.InvalidArgumentError, match="dense"):
            store.put(_key(3), torch.zeros(3).to_sparse())
        with pytest.raises(ls.InvalidArgumentError, match="cannot be stored"):
            store.put(_key(3), torch.zeros(2, dtype=torch.float8_e5m2fnuz))
        assert len(store) == 1


@pytest.mark.parametrize(("args", "message"), [
    ((-(1 << 63) - 1, 0, "a", 0), "iteration"),
    ((0, 1 << 31, "a", 0), "micro_batch"),
    ((0, 0, "", 0), "kind"),
    ((0, 0, "x" * 65, 0), "kind"),
    ((0, 0, "a", True), "peer"),
    ((0.5, 0, "a", 0), "iteration"),
])
def test_log_key_validation(args: tuple, message: str) -> None:
    with pytest.raises(ls.InvalidArgumentError, match=message):
        LogKey(*args)
    key = LogKey(-5, 3, "gradient", -1)
    assert LogKey.from_tag(key.to_tag()) == key


def test_config_validation() -> None:
    for options, message in (({"codec": "gzip"}, "unknown codec"), ({"codec": "zstd", "level": 99}, "level"),
                             ({"workers": -1}, "workers"), ({"chunk_bytes": 3000}, "power of two"),
                             ({"budget_bytes": -1}, "budget_bytes"), ({"spill_watermark": 0}, "spill_watermark"),
                             ({"max_raw_bytes": 0}, "max_raw_bytes")):
        with pytest.raises(ls.InvalidArgumentError, match=message):
            ls.LogStoreConfig(**options)
    with pytest.raises(TypeError):
        ls.LogStoreConfig("lz4")  # keyword-only
    config = ls.LogStoreConfig(codec="zstd", level=3, workers=0, reserve_bytes=0)
    with LogStore(config, shuffle=False) as store:
        assert store.config.codec == "zstd" and store.config.shuffle is False and store.config.level == 3


def test_closed_store_refuses_work_and_close_is_idempotent() -> None:
    store = LogStore(workers=2, **SMALL)
    store.put(_key(0), torch.zeros(3))
    store.close()
    store.close()
    for call in (lambda: store.put(_key(1), torch.zeros(1)), lambda: store.get(_key(0)), lambda: store.keys(),
                 lambda: store.drop_before(5), lambda: store.export()):
        with pytest.raises(ls.StoreClosedError):
            call()
    assert store.stats().entries == 0


def test_put_does_not_wait_for_compression(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the only worker stuck inside the codec, puts still return and entries stay raw."""
    import logging_store.store as store_module

    gate, entered = threading.Event(), threading.Event()
    real_encode = store_module.encode_chunks

    def stuck_encode(*args, **kwargs):
        entered.set()
        assert gate.wait(timeout=30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(store_module, "encode_chunks", stuck_encode)
    with LogStore(codec="zstd", workers=1, **SMALL) as store:
        tensors = {_key(i): smooth_tensor(torch.bfloat16, (64, 64), seed=i) for i in range(20)}
        for key, tensor in tensors.items():
            store.put(key, tensor)
        assert entered.wait(timeout=30)
        stats = store.stats()
        assert stats.raw_entries == 20 and stats.pending_entries == 19 and stats.resident_bytes == stats.raw_bytes
        _check_all(store, tensors)  # raw entries are readable while the worker is busy
        gate.set()
        assert store.wait_idle(timeout=30)
        assert store.stats().encoded_entries == 20
        _check_all(store, tensors)


def test_export_import_round_trip_bytes_and_files() -> None:
    with LogStore(codec="zstd", workers=1, **SMALL) as source:
        tensors = _fill(source)
        source.put(_key(20), torch.ones(5))  # outside the exported range
        early = source.export(0, 10)  # a mix of raw and encoded entries
        assert [f.header.tag for f in ls.iter_frames(early)] == [k.to_tag() for k in source.keys(0, 10)]
        assert source.wait_idle(timeout=30)
        blob = source.export(0, 10)
        file = io.BytesIO()
        assert source.export_to(file, 0, 10) == len(blob) and file.getvalue() == blob
    for stream in (early, blob, io.BytesIO(blob)):
        with LogStore(codec="lz4", workers=1, **SMALL) as target:
            assert target.import_(stream) == sorted(tensors)
            _check_all(target, tensors)
            assert target.wait_idle(timeout=30)
            _check_all(target, tensors)
            assert target.export(0, 10) and target.export(50, 60) == b""


def test_import_is_all_or_nothing() -> None:
    with LogStore(workers=0, **SMALL) as source:
        for i in range(3):
            source.put(_key(i), torch.full((100,), float(i)))
        blob = source.export()
    with LogStore(workers=0, **SMALL) as target:
        with pytest.raises(ls.TruncatedFrameError):
            target.import_(blob[:-1])
        with pytest.raises(ls.CorruptFrameError):
            target.import_(blob[:-30] + bytes([blob[-30] ^ 1]) + blob[-29:])
        target.put(_key(2), torch.zeros(1))
        with pytest.raises(ls.DuplicateKeyError):
            target.import_(blob)
        with pytest.raises(ls.DuplicateKeyError, match="twice"):
            target.import_(blob + blob)
        assert target.keys() == [_key(2)] and target.stats().raw_bytes == 4
        with pytest.raises(ls.CorruptFrameError, match="not exported by a LogStore"):
            target.import_(ls.encode(torch.zeros(3)))
        with pytest.raises(ls.UnsupportedFrameError, match="XOR-delta"):
            target.import_(ls.encode(torch.zeros(3), reference=torch.ones(3), tag=_key(7).to_tag()))
        assert target.keys() == [_key(2)]
