"""``LogStore``: a thread-safe, compressed, spillable host-memory store of logged tensors.

Life of an entry: ``put`` copies the tensor into pooled memory and returns (state *raw*); a
background worker later encodes it (filters + codec) and frees the pool regions (state
*encoded*); under memory pressure the oldest in-memory entries are written to a spill segment
(state *spilled*). ``get`` works in every state and returns the exact bytes that were put.

Concurrency: one lock guards the index and the accounting and is never held during a copy, a
codec call or disk I/O. Workers and spills work on a snapshot of an entry and commit only if the
entry is unchanged since (same object, same version), so drops and races just discard the work.
When the workers fall behind, entries simply stay raw (the newest are compressed first, the
oldest spill first), so ``put`` never waits for compression. Workers start a job after a short
lull in puts, so they do not compete with the training thread's copies for the GIL.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import replace
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import torch

from logging_store.chunks import EncodedPayload, Filter, chunk_views, decode_chunks, encode_chunks, plain_payload
from logging_store.codecs import Codec
from logging_store.config import LogStoreConfig
from logging_store.dtypes import dtype_code
from logging_store.errors import (
    CorruptFrameError,
    DuplicateKeyError,
    InvalidArgumentError,
    MissingKeyError,
    SpillError,
    StoreClosedError,
    UnsupportedFrameError,
)
from logging_store.frame import (
    MAX_NDIM,
    Frame,
    decode_frame,
    frame_parts,
    header_for,
    iter_frames,
    output_tensor,
    parse_frame,
    read_frames,
    tensor_bytes,
)
from logging_store.keys import LogKey
from logging_store.entries import Entry, EntryInfo, EntryState, StoreStats
from logging_store.pool import BufferPool, Lease, copy_into, copy_out
from logging_store.spill import Segment, SpillDirectory

_log = logging.getLogger(__name__)

# Background spilling goes this far below the watermark, so it writes few, large segments.
_SPILL_HYSTERESIS = 0.8
# Workers start a job after this long without a put (puts come in bursts), or after the maximum wait.
_PUT_LULL_SECONDS = 0.002
_MAX_LULL_WAIT_SECONDS = 0.02


class LogStore:
    """Compressed host-memory log of tensors keyed by :class:`LogKey`.

    ``LogStore(config)`` or ``LogStore(codec="zstd", budget_bytes=...)`` (keyword overrides of the
    config). Use as a context manager or call :meth:`close` to stop the workers and delete spills.
    """

    def __init__(self, config: LogStoreConfig | None = None, /, **options: Any) -> None:
        config = replace(config or LogStoreConfig(), **options)
        self._config = config
        self._codec = config.codec_id
        self._compresses = self._codec is not Codec.NONE and config.workers > 0
        self._pool = BufferPool(chunk_bytes=config.chunk_bytes, reserve_bytes=config.reserve_bytes)
        self._spill_dir = SpillDirectory(config.spill_dir)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._spill_mutex = threading.Lock()  # one spill at a time, so victims are never chosen twice
        self._entries: dict[LogKey, Entry] = {}
        self._resident: dict[LogKey, Entry] = {}  # in memory, oldest first: spill victims
        self._pending: dict[LogKey, Entry] = {}  # raw, awaiting a worker; newest compressed first
        self._counts = dict.fromkeys(EntryState, 0)
        self._raw_bytes = self._resident_bytes = self._spilled_bytes = 0
        self._compressed_total = self._spilled_total = 0
        self._busy_workers = 0
        self._sleeping_workers = 0  # waiting for work: only then does put pay for a notify
        self._background_spill_error: SpillError | None = None
        self._closed = False
        self._last_put = 0.0
        self._workers = [threading.Thread(target=self._work, name=f"logging_store-worker-{i}", daemon=True)
                         for i in range(config.workers if self._compresses or config.budget_bytes is not None else 0)]
        for worker in self._workers:
            worker.start()

    @property
    def config(self) -> LogStoreConfig:
        return self._config

    # --------------------------------------------------------------------------------- put/get

    def put(self, key: LogKey, tensor: torch.Tensor) -> None:
        """Logs a copy of ``tensor`` under ``key`` and returns; compression happens in the background.

        The copy goes into preallocated pool memory (a plain memory copy). Only when the memory
        budget is exceeded does ``put`` itself write the oldest entries to disk first.
        """
        self._last_put = time.monotonic()
        source = self._check_put(key, tensor)
        nbytes = source.numel() * source.element_size()
        budget = self._config.budget_bytes
        if budget is not None and nbytes > budget:
            self._spill_new(key, source)
            return
        if budget is not None and self._resident_bytes + nbytes > budget:
            self._spill(budget - nbytes)
        lease = self._pool.lease(nbytes)
        try:
            copy_into(lease, source)
            entry = Entry(key, source.dtype, tuple(source.shape), nbytes)
            entry.hold_raw(lease)
            with self._lock:
                self._check_open_locked()
                self._check_new_locked(key)
                self._insert_locked(entry)
        except BaseException:
            lease.release()
            raise

    def get(self, key: LogKey, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor put under ``key``: same dtype, shape and bytes, contiguous, on the CPU.

        ``out`` (a contiguous CPU tensor of that dtype and shape) receives it instead of a new tensor.
        """
        with self._lock:
            self._check_open_locked()
            entry = self._entries.get(key)
            if entry is None:
                raise MissingKeyError(f"no entry for {key}: it was never put, or was dropped by drop_before()")
            state, lease, payload, segment = entry.state, entry.lease, entry.payload, entry.segment
            offset, length = entry.offset, entry.stored_length
            if lease is not None:
                lease.retain()
            if segment is not None:
                self._spill_dir.retain(segment)
        try:
            result = output_tensor(entry.dtype, entry.shape, out)
            if state is EntryState.RAW:
                copy_out(lease, result)
            elif state is EntryState.ENCODED:
                decode_chunks(payload, chunk_views(tensor_bytes(result), payload.chunk_bytes),
                              itemsize=entry.dtype.itemsize)
            else:
                frame = parse_frame(self._spill_dir.read(segment, offset, length), max_raw_bytes=self._config.max_raw_bytes)
                if LogKey.from_tag(frame.header.tag) != key:
                    raise CorruptFrameError(f"spill segment {segment.path} holds {LogKey.from_tag(frame.header.tag)} "
                                            f"where {key} was written; the spill directory was modified")
                decode_frame(frame, out=result)
        finally:
            if lease is not None:
                lease.release()
            if segment is not None:
                self._spill_dir.release(segment)
        return result

    # --------------------------------------------------------------------------------- queries

    def keys(self, start: int | None = None, stop: int | None = None) -> list[LogKey]:
        """Keys with ``start <= iteration < stop`` (either bound may be None), sorted."""
        with self._lock:
            self._check_open_locked()
            return sorted(key for key in self._entries if _in_range(key, start, stop))

    def items(self, start: int | None = None, stop: int | None = None) -> Iterator[tuple[LogKey, torch.Tensor]]:
        """``(key, tensor)`` for :meth:`keys` ``(start, stop)``, decoded one at a time."""
        for key in self.keys(start, stop):
            yield key, self.get(key)

    def describe(self, key: LogKey) -> EntryInfo:
        """State and sizes of one entry."""
        with self._lock:
            self._check_open_locked()
            entry = self._entries.get(key)
            if entry is None:
                raise MissingKeyError(f"no entry for {key}: it was never put, or was dropped by drop_before()")
            return EntryInfo(key, entry.dtype, entry.shape, entry.state, entry.raw_length, entry.stored_length)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> StoreStats:
        pool = self._pool.stats()
        with self._lock:
            return StoreStats(
                entries=len(self._entries),
                raw_entries=self._counts[EntryState.RAW],
                encoded_entries=self._counts[EntryState.ENCODED],
                spilled_entries=self._counts[EntryState.SPILLED],
                pending_entries=len(self._pending),
                raw_bytes=self._raw_bytes,
                stored_bytes=self._resident_bytes + self._spilled_bytes,
                resident_bytes=self._resident_bytes,
                spilled_bytes=self._spilled_bytes,
                compressed_total=self._compressed_total,
                spilled_total=self._spilled_total,
                pool_bytes=pool.allocated_bytes,
                pool_free_bytes=pool.free_bytes,
            )

    # --------------------------------------------------------------------------------- dropping

    def drop_before(self, iteration: int) -> int:
        """Forgets every entry with ``key.iteration < iteration``; returns how many."""
        return self._drop(lambda key: key.iteration < iteration)

    def drop_from(self, iteration: int) -> int:
        """Forgets every entry with ``key.iteration >= iteration`` (an abandoned iteration's); returns how many."""
        return self._drop(lambda key: key.iteration >= iteration)

    def _drop(self, doomed_key: Callable[[LogKey], bool]) -> int:
        with self._lock:
            self._check_open_locked()
            doomed = [entry for key, entry in self._entries.items() if doomed_key(key)]
            for entry in doomed:
                self._remove_locked(entry)
        for entry in doomed:
            self._release_storage(entry)
        self._pool.trim(self._config.reserve_bytes + self._config.headroom_bytes)
        return len(doomed)

    # --------------------------------------------------------------------------------- export/import

    def export(self, start: int | None = None, stop: int | None = None) -> bytes:
        """Entries with ``start <= iteration < stop`` as one byte stream of frames (key order)."""
        buffer = io.BytesIO()
        self.export_to(buffer, start, stop)
        return buffer.getvalue()

    def export_to(self, file: BinaryIO, start: int | None = None, stop: int | None = None) -> int:
        """Writes :meth:`export` ``(start, stop)`` to a binary file object; returns the bytes written."""
        with self._lock:
            self._check_open_locked()
            snapshot = [self._pin_locked(self._entries[key])
                        for key in sorted(k for k in self._entries if _in_range(k, start, stop))]
        written = 0
        try:
            for entry, lease, payload, segment, offset, length in snapshot:
                if segment is not None:
                    data = self._spill_dir.read(segment, offset, length)
                    parse_frame(data, max_raw_bytes=self._config.max_raw_bytes)  # never ship a damaged frame
                    parts: list[Any] = [data]
                else:
                    parts = self._frame_parts(entry, lease, payload)
                file.writelines(parts)
                written += sum(memoryview(part).nbytes for part in parts)
        finally:
            for _, lease, _, segment, _, _ in snapshot:
                self._unpin(lease, segment)
        return written

    def import_(self, source: bytes | bytearray | memoryview | BinaryIO) -> list[LogKey]:
        """Adds every entry of an export stream (a buffer or a binary file object); returns their keys.

        All or nothing: every frame is verified (checksums, key tag) and no key may already be
        present before any entry is added. Verification decodes one chunk at a time into a scratch
        buffer, so a frame's claimed raw size is never allocated on trust (a small frame may claim
        gigabytes). Entries keep their stored chunks as views of ``source`` (no second copy of a
        transfer: do not modify a buffer after importing it; its memory is freed once its last
        entry is spilled or dropped), and are added one at a time, spilling whenever the budget is
        exceeded.
        """
        frames = list(read_frames(source, max_raw_bytes=self._config.max_raw_bytes) if hasattr(source, "read")
                      else iter_frames(source, max_raw_bytes=self._config.max_raw_bytes))
        keys = [_verify_import(frame) for frame in frames]
        if len(set(keys)) != len(keys):
            raise DuplicateKeyError("the stream holds the same key twice; it was not produced by export()")
        with self._lock:
            self._check_open_locked()
            for key in keys:
                self._check_new_locked(key)
        budget = self._config.budget_bytes
        added: set[LogKey] = set()
        try:
            for key, frame in zip(keys, frames):
                entry = Entry(key, frame.header.dtype, frame.header.shape, frame.header.raw_length)
                entry.hold_encoded(frame.payload)
                with self._lock:
                    self._check_open_locked()
                    self._check_new_locked(key)  # a concurrent put of the same key
                    self._insert_locked(entry)
                added.add(key)
                if budget is not None and self._resident_bytes > budget:
                    self._spill(budget)
        except BaseException:
            if added and not self._closed:
                self._drop(added.__contains__)
            raise
        return keys

    # --------------------------------------------------------------------------------- lifecycle

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until no entry awaits compression and no background spill is due; False on timeout."""
        with self._lock:
            return self._idle.wait_for(
                lambda: self._closed or (not self._pending and not self._busy_workers and not self._spill_due_locked()),
                timeout,
            )

    def close(self) -> None:
        """Stops the workers, frees the memory and deletes the spill directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
            self._idle.notify_all()
        for worker in self._workers:
            worker.join()
        with self._lock:
            entries = list(self._entries.values())
            for entry in entries:
                self._remove_locked(entry)
        for entry in entries:
            if entry.lease is not None:
                entry.lease.release()
        self._pool.trim(0)
        self._spill_dir.close()

    def __enter__(self) -> "LogStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- internals

    def _check_open_locked(self) -> None:
        if self._closed:
            raise StoreClosedError("the LogStore is closed; create a new one")

    def _check_new_locked(self, key: LogKey) -> None:
        if key in self._entries:
            raise DuplicateKeyError(f"{key} is already logged; every (iteration, micro_batch, kind, peer) is put once")

    def _check_put(self, key: LogKey, tensor: torch.Tensor) -> torch.Tensor:
        if self._closed:  # checked again under the lock when the entry is inserted
            raise StoreClosedError("the LogStore is closed; create a new one")
        if not isinstance(key, LogKey):
            raise InvalidArgumentError(f"key must be a LogKey, got {type(key).__name__}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise InvalidArgumentError(f"tensor must be a dense torch.Tensor, got {tensor!r:.80}")
        if tensor.dim() > MAX_NDIM:
            raise InvalidArgumentError(f"tensor has {tensor.dim()} dimensions; at most {MAX_NDIM} are supported")
        dtype_code(tensor.dtype)
        if tensor.is_conj() or tensor.is_neg():  # lazy views: materialise the values they stand for
            tensor = tensor.detach().resolve_conj().resolve_neg()
        return tensor

    def _account_locked(self, entry: Entry, sign: int) -> None:
        self._counts[entry.state] += sign
        self._raw_bytes += sign * entry.raw_length
        if entry.state is EntryState.SPILLED:
            self._spilled_bytes += sign * entry.stored_length
        else:
            self._resident_bytes += sign * entry.stored_length

    def _insert_locked(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        self._account_locked(entry, +1)
        if entry.state is not EntryState.SPILLED:
            self._resident[entry.key] = entry
        if entry.state is EntryState.RAW and self._compresses:
            self._pending[entry.key] = entry
        if self._sleeping_workers and (self._pending or self._spill_due_locked()):
            self._wake.notify()

    def _remove_locked(self, entry: Entry) -> None:
        del self._entries[entry.key]
        self._resident.pop(entry.key, None)
        self._pending.pop(entry.key, None)
        self._account_locked(entry, -1)
        entry.version += 1

    def _release_storage(self, entry: Entry) -> None:
        if entry.lease is not None:
            entry.lease.release()
        if entry.segment is not None:
            self._spill_dir.release(entry.segment)

    def _pin_locked(self, entry: Entry) -> tuple:
        """A snapshot of where an entry's bytes are, kept alive until :meth:`_unpin`."""
        if entry.lease is not None:
            entry.lease.retain()
        if entry.segment is not None:
            self._spill_dir.retain(entry.segment)
        return entry, entry.lease, entry.payload, entry.segment, entry.offset, entry.stored_length

    def _unpin(self, lease: Lease | None, segment: Segment | None) -> None:
        if lease is not None:
            lease.release()
        if segment is not None:
            self._spill_dir.release(segment)

    def _frame_parts(self, entry: Entry, lease: Lease | None, payload: EncodedPayload | None) -> list[Any]:
        """An in-memory entry as frame buffers; raw entries are framed uncompressed, without a copy."""
        if payload is None:
            payload = plain_payload(lease.arrays, chunk_bytes=self._config.chunk_bytes)
        return frame_parts(header_for(entry.dtype, entry.shape, payload, tag=entry.key.to_tag()), payload)

    # ------------------------------------------------------------------------- background work

    def _spill_due_locked(self) -> bool:
        budget = self._config.budget_bytes
        return (budget is not None and self._background_spill_error is None and bool(self._workers)
                and self._resident_bytes > budget * self._config.spill_watermark)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._pending and not self._spill_due_locked():
                    self._idle.notify_all()
                    self._sleeping_workers += 1
                    self._wake.wait()
                    self._sleeping_workers -= 1
                if self._closed:
                    return
                job = None
                if not self._spill_due_locked():
                    entry = self._pending.popitem()[1]
                    entry.lease.retain()
                    job = (entry, entry.lease, entry.version)
                self._busy_workers += 1
            try:
                self._wait_for_lull()
                if job is None:
                    self._background_spill()
                else:
                    self._compress(*job)
            except StoreClosedError:
                return
            except Exception:  # noqa: BLE001 - a worker must survive; the entry simply stays as it was
                _log.exception("logging_store worker failed; the entry stays uncompressed in memory")
            finally:
                with self._lock:
                    self._busy_workers -= 1
                    if not self._pending and not self._busy_workers:
                        self._idle.notify_all()
            self._pool.ensure_free(self._config.headroom_bytes)

    def _wait_for_lull(self) -> None:
        """Lets a burst of puts finish first: working alongside put slows it (GIL hand-offs, memory bus).

        Waits at most ``_MAX_LULL_WAIT_SECONDS`` so that back-to-back puts cannot starve the workers.
        """
        give_up = time.monotonic() + _MAX_LULL_WAIT_SECONDS
        while not self._closed:
            now = time.monotonic()
            quiet = now - self._last_put
            if quiet >= _PUT_LULL_SECONDS or now >= give_up:
                return
            time.sleep(min(_PUT_LULL_SECONDS - quiet, give_up - now))

    def _compress(self, entry: Entry, lease: Lease, version: int) -> None:
        """Encodes a raw entry from its pinned ``lease`` and swaps it in if the entry did not change."""
        try:
            payload = encode_chunks(
                lease.arrays, codec=self._codec, level=self._config.level,
                filter_bits=Filter.SHUFFLE if self._config.shuffle and entry.dtype.itemsize > 1 else Filter.NONE,
                itemsize=entry.dtype.itemsize, chunk_bytes=self._config.chunk_bytes,
            )
        finally:
            lease.release()
        with self._lock:
            if self._entries.get(entry.key) is not entry or entry.version != version:
                return  # dropped or spilled meanwhile
            own = entry.lease
            self._account_locked(entry, -1)
            entry.hold_encoded(payload)
            self._account_locked(entry, +1)
            self._compressed_total += 1
        own.release()

    def _background_spill(self) -> None:
        budget = self._config.budget_bytes
        try:
            self._spill(int(budget * self._config.spill_watermark * _SPILL_HYSTERESIS))
        except SpillError as error:
            _log.error("background spilling stopped: %s; put() will retry and raise if it still fails", error)
            with self._lock:
                self._background_spill_error = error

    def _spill(self, target: int) -> None:
        """Writes the oldest in-memory entries to one spill segment until resident bytes <= target."""
        with self._spill_mutex:
            with self._lock:
                self._check_open_locked()
                victims = []
                freed = 0
                for entry in self._resident.values():
                    if self._resident_bytes - freed <= target:
                        break
                    victims.append((self._pin_locked(entry), entry.version))
                    freed += entry.stored_length
            if not victims:
                return
            try:
                segment, placements = self._spill_dir.write(
                    [self._frame_parts(entry, lease, payload) for (entry, lease, payload, *_), _ in victims]
                )
            finally:
                for (_, lease, _, segment_pin, _, _), _ in victims:
                    self._unpin(lease, segment_pin)
            released = []
            with self._lock:
                for ((entry, *_), version), (offset, length) in zip(victims, placements):
                    if self._closed or self._entries.get(entry.key) is not entry or entry.version != version:
                        continue
                    self._spill_dir.retain(segment)
                    self._account_locked(entry, -1)
                    released.append(entry.lease)
                    self._resident.pop(entry.key)
                    self._pending.pop(entry.key, None)
                    entry.hold_spilled(segment, offset, length)
                    self._account_locked(entry, +1)
                    self._spilled_total += 1
                self._background_spill_error = None
            for lease in released:
                if lease is not None:
                    lease.release()
            self._spill_dir.release(segment)  # the writer's reference

    def _spill_new(self, key: LogKey, source: torch.Tensor) -> None:
        """Writes an entry larger than the whole budget straight to disk, without passing through memory."""
        host = source.detach().to("cpu").contiguous()
        entry = Entry(key, host.dtype, tuple(host.shape), host.numel() * host.element_size())
        payload = plain_payload(chunk_views(tensor_bytes(host), self._config.chunk_bytes), chunk_bytes=self._config.chunk_bytes)
        segment, [(offset, length)] = self._spill_dir.write(
            [frame_parts(header_for(entry.dtype, entry.shape, payload, tag=key.to_tag()), payload)]
        )
        try:
            with self._lock:
                self._check_open_locked()
                self._check_new_locked(key)
                self._spill_dir.retain(segment)
                entry.hold_spilled(segment, offset, length)
                self._insert_locked(entry)
                self._spilled_total += 1
        finally:
            self._spill_dir.release(segment)


def _in_range(key: LogKey, start: int | None, stop: int | None) -> bool:
    return (start is None or key.iteration >= start) and (stop is None or key.iteration < stop)


def _verify_import(frame: Frame) -> LogKey:
    """The frame's key, once its raw bytes decoded, one chunk at a time, to the raw checksum."""
    header = frame.header
    key = LogKey.from_tag(header.tag)
    if header.filters & Filter.XOR_DELTA:
        raise UnsupportedFrameError(f"frame for {key} is an XOR-delta frame; a LogStore cannot hold those "
                                    "(they need their reference to decode)")
    scratch = np.empty(min(header.chunk_bytes, header.raw_length), np.uint8)
    outputs = [scratch[: header.raw_chunk_length(i)] for i in range(header.chunk_count)]
    decode_chunks(frame.payload, outputs, itemsize=header.dtype.itemsize)  # each chunk checksummed as decoded
    return key
