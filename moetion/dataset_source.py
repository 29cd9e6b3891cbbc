"""A map-style ``torch.utils.data.Dataset`` as a :class:`~moetion.data.DataSource`.

Recovery needs any stage, in any process, to re-read micro-batch ``(iteration, index)`` and get the
same tensors. A ``DataLoader`` iterates instead, and its shuffled order depends on generator state.
Here the order of epoch ``e`` is a permutation that is a pure function of ``(seed, e)``, and the
micro-batches are numbered across the whole run, so ``(iteration, index)`` names exact dataset
indices with no state at all: global micro-batch ``g = iteration * per_iteration + index`` is
micro-batch ``g mod per_epoch`` of epoch ``g // per_epoch``. Micro-batches never straddle an epoch
boundary (as a ``DataLoader``'s batches do not); an iteration may.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from moetion.data import Batch
from moetion.errors import DataError
from moetion.random import DOMAIN_DATA, derive_seed

Collate = Callable[[list[Any]], Any]


def shuffle_generator(loader: DataLoader) -> torch.Generator | None:
    """The generator a shuffling loader draws its order from (``None`` if it does not shuffle).

    A shuffle drawn from the global RNG differs in every process (the first and the last stage
    would pair other inputs with other labels) and after every restart, so it is refused. A
    torchdata ``StatefulDataLoader`` seeds its own sampler's generator from the global RNG unless
    the loader is given one, so for it only the loader's ``generator`` counts.
    """
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        generator = loader.generator or sampler.generator
    elif type(sampler).__name__ == "RandomSampler":  # torchdata's, which does not subclass torch's
        generator = loader.generator
    else:
        return None
    if generator is None:
        raise DataError("the DataLoader shuffles without a seeded generator, so its order is not "
                        "reproducible: pass DataLoader(..., generator=torch.Generator().manual_seed(s))")
    return generator


class DatasetSource:
    """Micro-batches of a map-style dataset, addressable by ``(iteration, index)``.

    Args:
        dataset: anything with ``__len__`` and ``__getitem__`` (a ``torch.utils.data.Dataset``, a
            Hugging Face ``datasets`` table with ``set_format("torch")``).
        micro_batch_size: items per micro-batch.
        micro_batches_per_iteration: micro-batches of one iteration over every data-parallel
            replica (``config.micro_batches x replicas``).
        collate_fn: turns a list of items into ``(inputs, labels)``; default: torch's
            ``default_collate`` of items that are ``(input, label)`` pairs.
        drop_last: drop an epoch's final partial micro-batch. Pipeline links need every
            micro-batch to have one shape, so keep it ``True`` unless ``collate_fn`` pads.
        shuffle: a new permutation each epoch, a pure function of ``(seed, epoch)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        micro_batch_size: int,
        micro_batches_per_iteration: int,
        collate_fn: Collate | None = None,
        drop_last: bool = True,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if micro_batch_size < 1 or micro_batches_per_iteration < 1:
            raise DataError(f"micro_batch_size and micro_batches_per_iteration must be >= 1, "
                            f"got {micro_batch_size} and {micro_batches_per_iteration}")
        self.dataset, self.length = dataset, len(dataset)
        self.micro_batch_size, self.per_iteration = micro_batch_size, micro_batches_per_iteration
        self.collate_fn, self.drop_last, self.shuffle, self.seed = collate_fn, drop_last, shuffle, seed
        per_epoch = self.length // micro_batch_size if drop_last else math.ceil(self.length / micro_batch_size)
        if per_epoch < 1:
            raise DataError(f"a dataset of {self.length} items holds no micro-batch of {micro_batch_size} "
                            "(drop_last=True): use a smaller micro_batch_size or more data")
        self.micro_batches_per_epoch = per_epoch
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation), the last one used

    @classmethod
    def from_loader(cls, loader: DataLoader, *, micro_batches_per_iteration: int) -> "DatasetSource":
        """The same dataset, batch size, ``collate_fn`` and ``drop_last`` as ``loader``.

        A shuffled loader must have been built with a seeded ``generator``: its seed becomes the
        shuffle seed (moetion's order is a pure function of it and the epoch, not the loader's order).
        """
        if loader.batch_size is None:
            raise DataError("the DataLoader has a batch_sampler; give DatasetSource the dataset and micro_batch_size")
        generator = shuffle_generator(loader)
        if generator is not None:
            shuffle, seed = True, generator.initial_seed()
        elif isinstance(loader.sampler, SequentialSampler):
            shuffle, seed = False, 0
        else:
            raise DataError(f"the DataLoader's sampler {type(loader.sampler).__name__} is not supported: "
                            "use shuffle=True with a seeded generator, or shuffle=False")
        collate = None if loader.collate_fn is default_collate else loader.collate_fn
        return cls(loader.dataset, micro_batch_size=loader.batch_size, micro_batches_per_iteration=micro_batches_per_iteration,
                   collate_fn=collate, drop_last=loader.drop_last, shuffle=shuffle, seed=seed)

    def indices(self, iteration: int, index: int) -> list[int]:
        """The dataset indices of micro-batch ``index`` of ``iteration``."""
        if iteration < 0 or not 0 <= index < self.per_iteration:
            raise DataError(f"(iteration, micro-batch) must be >= 0 with micro-batch < {self.per_iteration}, got "
                            f"({iteration}, {index}): micro_batches_per_iteration counts every replica's micro-batches")
        epoch, position = divmod(iteration * self.per_iteration + index, self.micro_batches_per_epoch)
        start = position * self.micro_batch_size
        stop = min(start + self.micro_batch_size, self.length)
        if not self.shuffle:
            return list(range(start, stop))
        return self._permutation(epoch)[start:stop].tolist()

    def epoch_of(self, iteration: int, index: int) -> int:
        """The epoch micro-batch ``(iteration, index)`` belongs to."""
        return (iteration * self.per_iteration + index) // self.micro_batches_per_epoch

    def micro_batch(self, iteration: int, index: int) -> Batch:
        ids = self.indices(iteration, index)
        items = [self.dataset[i] for i in ids]
        if self.collate_fn is None:
            _check_alike(items, ids)
            batch = default_collate(items)
        else:
            batch = self.collate_fn(items)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, torch.Tensor) for b in batch)):
            raise DataError(f"the collated micro-batch ({iteration}, {index}) must be (inputs, labels) tensors, "
                            f"got {type(batch).__name__}: return a pair from collate_fn or from the dataset items")
        return batch[0], batch[1]

    def _permutation(self, epoch: int) -> torch.Tensor:
        order = self._order  # one read: prefetch threads may replace it concurrently
        if order is None or order[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(DOMAIN_DATA, "dataset-shuffle", self.seed, epoch))
            order = (epoch, torch.randperm(self.length, generator=gen))
            self._order = order
        return order[1]


def _check_alike(items: Sequence[Any], ids: Sequence[int]) -> None:
    """Items batched by ``default_collate`` must have one structure, shape and dtype; name the odd one."""
    first = _signature(items[0])
    for item, i in zip(items[1:], ids[1:]):
        found = _signature(item)
        if found != first:
            raise DataError(f"dataset item {i} is {found} but item {ids[0]} of the same micro-batch is {first}: "
                            "every item must have the same shapes and dtypes (or pass a collate_fn that pads)")


def _signature(item: Any) -> Any:
    if isinstance(item, torch.Tensor):
        return f"tensor{tuple(item.shape)}:{str(item.dtype).removeprefix('torch.')}"
    if isinstance(item, (tuple, list)):
        return tuple(_signature(x) for x in item)
    if isinstance(item, dict):
        return tuple((k, _signature(v)) for k, v in sorted(item.items()))
    return type(item).__name__
