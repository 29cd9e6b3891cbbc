"""Map-style datasets and token files as addressable data sources (no processes)."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from moetion import DataError
from moetion.dataset_source import DatasetSource
from moetion.token_file import TokenWindows, token_file_source


class Numbered(Dataset):
    """Item i: input row [i, i] and label i."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.tensor([i, i]), torch.tensor(i)


def every_id(source: DatasetSource, iterations: int) -> list[int]:
    return [i for t in range(iterations) for m in range(source.per_iteration) for i in source.indices(t, m)]


def test_shuffled_epochs_cover_every_item_once_and_differ():
    source = DatasetSource(Numbered(24), micro_batch_size=3, micro_batches_per_iteration=2, shuffle=True, seed=7)
    assert source.micro_batches_per_epoch == 8
    first, second = every_id(source, 4), [i for t in range(4, 8) for m in range(2) for i in source.indices(t, m)]
    assert sorted(first) == sorted(second) == list(range(24))
    assert first != second, "each epoch has its own permutation"
    again = DatasetSource(Numbered(24), micro_batch_size=3, micro_batches_per_iteration=2, shuffle=True, seed=7)
    assert every_id(again, 8) == first + second, "a pure function of (seed, epoch): any process gets the same"
    other = DatasetSource(Numbered(24), micro_batch_size=3, micro_batches_per_iteration=2, shuffle=True, seed=8)
    assert every_id(other, 4) != first


def test_micro_batch_collates_the_items_it_names():
    source = DatasetSource(Numbered(10), micro_batch_size=2, micro_batches_per_iteration=2, shuffle=True, seed=1)
    x, y = source.micro_batch(3, 1)
    assert torch.equal(y, torch.tensor(source.indices(3, 1)))
    assert x.shape == (2, 2) and torch.equal(x[:, 0], y)


def test_epoch_boundary_with_and_without_drop_last():
    # 7 items, micro-batches of 3: drop_last keeps 2 per epoch; otherwise 3, the last holding one item.
    dropped = DatasetSource(Numbered(7), micro_batch_size=3, micro_batches_per_iteration=1)
    assert [dropped.indices(t, 0) for t in range(3)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    kept = DatasetSource(Numbered(7), micro_batch_size=3, micro_batches_per_iteration=1, drop_last=False)
    assert [kept.indices(t, 0) for t in range(4)] == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2]]
    assert [kept.epoch_of(t, 0) for t in range(4)] == [0, 0, 0, 1]
    # An iteration may straddle the boundary; its micro-batches do not.
    straddle = DatasetSource(Numbered(6), micro_batch_size=2, micro_batches_per_iteration=2, shuffle=True)
    assert straddle.epoch_of(1, 0) == 0 and straddle.epoch_of(1, 1) == 1


def test_custom_collate_fn_and_from_loader():
    def collate(items):
        return torch.stack([x for x, _ in items]) * 10, torch.stack([y for _, y in items])

    seeded = DataLoader(Numbered(8), batch_size=2, shuffle=True, drop_last=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(42))
    source = DatasetSource.from_loader(seeded, micro_batches_per_iteration=2)
    assert (source.shuffle, source.seed, source.micro_batch_size, source.drop_last) == (True, 42, 2, True)
    x, y = source.micro_batch(0, 0)
    assert torch.equal(x[:, 0], y * 10)
    plain = DatasetSource.from_loader(DataLoader(Numbered(8), batch_size=4), micro_batches_per_iteration=1)
    assert plain.indices(1, 0) == [4, 5, 6, 7]


def test_a_loader_shuffled_without_a_seeded_generator_is_refused():
    with pytest.raises(DataError, match="shuffles without a seeded generator"):
        DatasetSource.from_loader(DataLoader(Numbered(8), batch_size=2, shuffle=True), micro_batches_per_iteration=1)


class OneOdd(Numbered):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x.float() if i == 5 else x), y


def test_an_item_of_another_dtype_or_shape_is_named():
    source = DatasetSource(OneOdd(8), micro_batch_size=4, micro_batches_per_iteration=1)
    with pytest.raises(DataError, match=r"dataset item 5 is .*float32.* but item 4 .*int64"):
        source.micro_batch(1, 0)
    with pytest.raises(DataError, match="must be \\(inputs, labels\\) tensors"):
        DatasetSource(Numbered(4), micro_batch_size=2, micro_batches_per_iteration=1,
                      collate_fn=lambda items: {"x": 1}).micro_batch(0, 0)


def test_too_little_data_and_bad_addresses():
    with pytest.raises(DataError, match="holds no micro-batch"):
        DatasetSource(Numbered(3), micro_batch_size=4, micro_batches_per_iteration=1)
    with pytest.raises(DataError, match="micro-batch < 2"):
        DatasetSource(Numbered(8), micro_batch_size=2, micro_batches_per_iteration=2).indices(0, 2)


def write_tokens(path, values, dtype):
    np.asarray(values, dtype=dtype).tofile(path)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows_and_stride(tmp_path, dtype):
    path = tmp_path / "tokens.bin"
    write_tokens(path, np.arange(100) + 60000, dtype)
    windows = TokenWindows(path, dtype=dtype, seq_len=8, stride=4)
    assert len(windows) == (100 - 9) // 4 + 1
    x, y = windows[3]
    assert x.dtype == torch.int64 and torch.equal(x, torch.arange(12, 20) + 60000)
    assert torch.equal(y, x + 1)
    source = token_file_source(path, dtype=dtype, seq_len=8, stride=4, micro_batch_size=2,
                               micro_batches_per_iteration=2, seed=3)
    ids = every_id(source, source.micro_batches_per_epoch // 2)
    assert len(set(ids)) == len(ids) and set(ids) <= set(range(len(windows)))
    x, y = source.micro_batch(0, 1)
    assert torch.equal(x[:, 0], torch.tensor(source.indices(0, 1)) * 4 + 60000)


def test_token_file_is_read_lazily_through_memmap(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:  # a sparse 4 GiB file: loading it whole would not go unnoticed
        f.truncate(4 << 30)
    windows = TokenWindows(path, dtype="uint32", seq_len=16)
    assert len(windows) == ((1 << 30) - 17) // 16 + 1
    x, _ = windows[len(windows) - 1]
    assert x.shape == (16,) and int(x.sum()) == 0


def test_token_file_size_must_be_a_multiple_of_the_width(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\0" * 101)
    with pytest.raises(DataError, match="101 bytes, not a multiple of the 2-byte uint16"):
        TokenWindows(path, dtype="uint16", seq_len=4)
    with pytest.raises(DataError, match="token dtype must be one of"):
        TokenWindows(path, dtype="int8", seq_len=4)
