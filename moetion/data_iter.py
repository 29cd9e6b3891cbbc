"""``train_batch(data_iter=...)``: a loader the user already has, resumed exactly after a failure.

Each ``next()`` of the iterator is one micro-batch ``(inputs, labels)`` of this replica (DeepSpeed's
convention), ``config.micro_batches`` of them per iteration. Only the first stage (inputs) and the
last stage (labels) read; each holds its own loader, built the same way, and middle stages ignore
theirs.

Where a replay's inputs come from. A replacement restores its loader to the position captured with
the window's first capture (the loader's ``state_dict()`` as of the start of iteration ``t0 + 1``)
and re-reads the replayed iterations from it; training then continues from exactly the next batch.
The alternative, shipping every micro-batch a stage read to a neighbour's log, would send labels
and token ids across every boundary each iteration to serve a rare failure, while a resumable
loader's state is a few kilobytes a window. It requires what ``state_dict()`` promises anyway:
the same state yields the same batches (a torchdata ``StatefulDataLoader`` with a seeded shuffle).

End of data. During iteration ``t`` a reading stage reads iteration ``t + 1``'s micro-batches ahead
(they are read either way; taking the position first costs one ``state_dict()`` an iteration), so
it knows at ``t``'s commit whether the loader ran dry; the flag rides on the commit all-gather, and
every rank's next ``train_batch`` raises :class:`DataExhausted` at that iteration boundary, with
every committed iteration kept.

A plain iterator (no ``state_dict``/``load_state_dict``) trains, but a reading stage that must be
restored from a window, or restarted, needs a position to resume from: that is a :class:`DataError`
saying which forms work.
"""
from __future__ import annotations

import base64
from typing import Any, Iterable, Iterator

import torch

from moetion import tensor_tree
from moetion.data import Batch
from moetion.dataset_source import shuffle_generator
from moetion.errors import DataError
from moetion.snapshot.image import WindowImage

STATE_KEY = "data_iter"  # the key of the loader's position in a window manifest's ``extra``
RESUMABLE_FORMS = ("a torchdata StatefulDataLoader, an iterator with state_dict()/load_state_dict(), "
                   "or an addressable moetion.DatasetSource passed as train_batch(data)")


class DataExhausted(DataError):
    """The data iterator ran out: training ends at an iteration boundary, every committed iteration kept."""


class IteratorSource:
    """A user's iterator of micro-batches, seen by the iteration body as ``micro_batch(iteration, index)``.

    Micro-batches are pulled in index order and kept for their iteration, so an iteration re-run
    after a lost peer trains on the same ones. ``loader`` may be an iterator or an iterable (a
    ``DataLoader``); a resumable one has ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, loader: Iterable | Iterator, *, where: str) -> None:
        if isinstance(loader, torch.utils.data.DataLoader):
            shuffle_generator(loader)  # a shuffle from the global RNG differs on the first and last stage
        self.loader, self.where = loader, where
        self.resumable = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
        self._iterator = iter(loader)
        self._batches: dict[int, dict[int, Batch]] = {}  # iteration -> index -> micro-batch
        self._position: tuple[int, str | None] | None = None  # (t, encoded state at the start of t), newest

    def micro_batch(self, iteration: int, index: int) -> Batch:
        batches = self._pull_into(iteration)
        if index not in batches:
            batches[index] = self._next(iteration, index)
        return batches[index]

    def read_ahead(self, iteration: int, indices: list[int]) -> bool:
        """Pulls ``iteration``'s micro-batches now; ``False`` when the loader ran out first."""
        batches = self._pull_into(iteration)
        try:
            for index in indices:
                if index not in batches:
                    batches[index] = self._next(iteration, index)
        except DataExhausted:
            return False
        return True

    def window_state(self) -> dict[str, Any]:
        """The position at the start of the newest iteration pulled: after a window's first capture
        (step ``t0``), that of ``t0 + 1``, the first iteration a replay of the window runs."""
        if self._position is None:
            return {"iteration": 0, "position": None}
        iteration, position = self._position
        return {"iteration": iteration, "position": position}

    def restore(self, state: dict[str, Any], *, first_iteration: int) -> None:
        """Puts the loader back where it stood at the start of ``first_iteration``."""
        if not self.resumable or state.get("position") is None:
            whose = "the loader" if not self.resumable else "the run's loader (so the window holds no position)"
            raise DataError(f"{self.where} must resume its data_iter at iteration {first_iteration}, but {whose} "
                            f"has no state_dict()/load_state_dict(); use {RESUMABLE_FORMS}")
        if state["iteration"] != first_iteration:
            raise DataError(f"{self.where}: the window holds the data position of iteration {state['iteration']}, "
                            f"the replay starts at {first_iteration}")
        raw = base64.b64decode(state["position"])
        position = tensor_tree.decode(bytearray(raw), source=f"the data position of {self.where}")
        try:
            self.loader.load_state_dict(position)
            self._iterator = iter(self.loader)  # an iterator is its own; a loader starts one from the loaded state
        except Exception as error:  # noqa: BLE001 - any loader's refusal, as one line
            raise DataError(f"{self.where}: the data_iter ({type(self.loader).__name__}) cannot load the position the "
                            f"run saved ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                            "pass a loader built exactly as in the run") from None
        self._batches.clear()
        self._position = (first_iteration, state["position"])

    def _pull_into(self, iteration: int) -> dict[int, Batch]:
        """The batches of ``iteration``, started (position taken) on its first pull; older ones dropped."""
        if iteration not in self._batches:
            if self._batches and iteration != max(self._batches) + 1:
                raise DataError(f"{self.where}: the data_iter is read in iteration order, but iteration {iteration} "
                                f"was asked for after {max(self._batches)}")
            self._position = (iteration, self._encoded_state())
            self._batches = {t: b for t, b in self._batches.items() if t >= iteration - 1}
            self._batches[iteration] = {}
        return self._batches[iteration]

    def _next(self, iteration: int, index: int) -> Batch:
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise DataExhausted(f"{self.where}: the data_iter ran out at micro-batch {index} of iteration "
                                f"{iteration}") from None
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"{self.where}: the data_iter must yield (inputs, labels) micro-batches; micro-batch "
                            f"{index} of iteration {iteration} is a {type(batch).__name__}")
        return batch[0], batch[1]

    def _encoded_state(self) -> str | None:
        if not self.resumable:
            return None
        try:
            return base64.b64encode(tensor_tree.encode(self.loader.state_dict())).decode("ascii")
        except TypeError as error:
            raise DataError(f"{self.where}: the data_iter's state_dict() holds {error}; moetion keeps it in the "
                            "window without pickle, as tensors, numbers, strings, lists and dicts") from None


def restore_data_position(data: object, window: WindowImage, *, where: str) -> None:
    """Before replaying ``window``: a data_iter resumes where the window's first replayed iteration began.

    A stage trained on a data_iter must replay with one, and a stage trained on an addressable source
    with one of those, or the replay would train on other samples than the run did.
    """
    state = window.manifest.extra.get(STATE_KEY)
    first = window.manifest.start_iteration + 1
    if isinstance(data, IteratorSource):
        if state is None:
            raise DataError(f"{where}: window {window.manifest.start_iteration} was trained on an addressable data "
                            "source, so pass that source (train_batch(data)), not a data_iter")
        data.restore(state, first_iteration=first)
    elif state is not None:
        raise DataError(f"{where}: window {window.manifest.start_iteration} was trained on a data_iter; pass the "
                        "same loader as train_batch(data_iter=...) (or as the export job's data)")


def as_reading_source(data: object, *, where: str) -> object:
    """``data`` itself when it is addressable (has ``micro_batch``), else the iterator wrapped."""
    return data if callable(getattr(data, "micro_batch", None)) else IteratorSource(data, where=where)
