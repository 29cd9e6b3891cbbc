"""The sparse checkpointer: the window lifecycle of one stage replica.

Call order per iteration (the engine does this): ``begin_iteration(t)``; ``dp_payload()`` rides
on the data-parallel gradient all-reduce and ``absorb_dp()`` reads it back; ``stage_payload()``
rides on the commit all-gather and ``absorb_gather()`` reads every stage's; ``before_step()``
fences the previous capture; ``after_step(t)`` captures.

Windows are decided job-wide without extra collectives: every rank proposes a W each iteration
(Algorithm 1 on its measured iteration time and copy bandwidth, or the pinned value); replicas of
a stage average their proposals on the gradient all-reduce, stages take the maximum on the commit
all-gather. The value gathered at a *decision iteration* ``d`` (iteration 0, then the last
iteration of every window) is the W of the window starting at ``d + 1``, identical on every rank.

States: ``WAITING`` (before the first window) -> ``CAPTURING`` (window t0..t0+W-1; capture ``i``
after step ``t0+i``) -> the last capture publishes the window to shared memory, and the next
window starts at once. A replacement joins mid-window in ``SKIPPING``: it follows the job's window
schedule without capturing (its predecessor's earlier captures died with it) until the next window.

Log retention is job-wide too: each stage reports the oldest window it could restore from (its
newest window in shared memory, or on disk when persisting) on the commit all-gather, and logs are
kept from the minimum over the stages, so every stage's restore finds its neighbours' logs.

Group keeping (expert parallelism: a lost rank's experts may have no other copy, and then every
replica of its stage replays together from a window each of them holds): each replica puts the
windows it holds (and -1 while it keeps the stage's initial state) into its own slots of the
data-parallel all-reduce; the newest window every replica holds becomes the stage's *common*
window, which each keeps (windows from it on stay in shared memory) and reports as its restorable
start, so its neighbours keep their logs back to it. Older windows and the initial state go once a
newer window is common.
"""
from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from moetion.config import SnapshotConfig
from moetion.device_copy import capture_copier
from moetion.errors import ConfigError
from moetion.faults import fault_point, register_memory
from moetion.model_state import state_tensors
from moetion.operators import OPERATOR_KINDS, Operator, discover_operators, kind_counts
from moetion.profiling import CAPTURE, FENCE, LEDGER, PROPOSE, STORED
from moetion.routing import expert_counts
from moetion.snapshot.capture import CaptureWorker, CopyJob
from moetion.snapshot.delta import DeltaCodec
from moetion.snapshot.image import (Capture, SnapshotError, WindowImage, WindowManifest, checksum,
                                    with_checksums)
from moetion.snapshot.layout import WindowLayout, plan_layout
from moetion.snapshot.persist import AsyncPersister
from moetion.snapshot.replica import PeerReplicator
from moetion.snapshot.shm import SharedMemoryTier
from moetion.window import (BackgroundWork, SlotPlan, capture_budget_bytes, cpu_seconds_per_captured_byte,
                            find_window_size, popularity_drifted, snapshot_order, split_into_slots)

log = logging.getLogger(__name__)

HELD_SLOTS = 3  # windows (or -1, the initial state) a replica reports holding, newest first
_NO_WINDOW = -2.0  # an empty slot
_EMA = 0.3  # weight of the newest measurement of iteration time and bandwidth
# On CPU, snapshot threads take cores from training: their CPU (capture, checksums, replication,
# persistence) may be this share of the training thread's CPU. With CUDA the copy runs behind compute: 1.0.
CPU_BUDGET_FRACTION = 0.04


class WindowState(enum.Enum):
    WAITING = "waiting"
    CAPTURING = "capturing"
    SKIPPING = "skipping"


@dataclass(frozen=True)
class StageIdentity:
    run_id: str
    job_nonce: str
    stage: int
    replica: int
    data_parallel: int
    threads: int
    precision: str
    expert_parallel: int = 1


class SparseCheckpointer:
    """Captures one window after another for one stage replica and keeps them in the tiers."""

    def __init__(
        self,
        *,
        master: nn.Module,
        compute: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SnapshotConfig,
        identity: StageIdentity,
        replicator: PeerReplicator | None = None,
    ) -> None:
        self.master, self.compute, self.optimizer = master, compute, optimizer
        self.config = config
        self.identity = identity
        self.operators: dict[str, Operator] = {op.name: op for op in discover_operators(master)}
        self._master_params = list(master.parameters())
        self._experts = [op.name for op in self.operators.values() if op.kind == "expert"]
        self.kinds = kind_counts(list(self.operators.values()))
        # The experts whose token counts ride on the data-parallel all-reduce: every expert of the
        # stage, also those other expert-parallel ranks hold, so that every replica sends one layout.
        self._counted = _counted_experts(master, list(self.operators.values()))
        self.full_bytes = {n: op.full_bytes() for n, op in self.operators.items()}
        self.compute_bytes = {n: op.compute_bytes(precision=identity.precision) for n, op in self.operators.items()}
        self.shm = SharedMemoryTier(config.shm_dir, run_id=identity.run_id, job_nonce=identity.job_nonce,
                                    stage=identity.stage, replica=identity.replica)
        register_memory(self.shm.directory)
        self.device = _device_of(master)
        self.worker = CaptureWorker(name=f"moetion-capture-s{identity.stage}", copier=capture_copier(self.device))
        self.state = WindowState.WAITING
        self.order = snapshot_order(list(self.operators.values()), {})
        self.plan: SlotPlan | None = None
        self.window_start: int | None = None
        self.windows_completed = 0
        self.last_complete: WindowManifest | None = None
        self._window: _WindowBuffers | None = None
        self._layout: WindowLayout | None = None  # the latest planned layout, reused while it fits
        self._layout_key: tuple | None = None  # what the layout was planned for (see _layout_for)
        self._popularity_used: dict[str, float] = {}
        self._popularity_now: dict[str, float] = {n: 0.0 for n in self._experts}
        self._iteration_seconds: float | None = None  # wall-clock, EMA
        self._iteration_cpu: float | None = None  # the training thread's CPU-seconds, EMA
        self._iteration_start, self._iteration_cpu_start = time.perf_counter(), time.thread_time()
        probed_bandwidth, self._probed_cpu_per_byte = _probe_capture(master)
        self._bandwidth = config.bandwidth_gbps * 1e9 if config.bandwidth_gbps else probed_bandwidth
        self._budget_fraction = config.budget_fraction or (1.0 if self.device.type == "cuda" else CPU_BUDGET_FRACTION)
        self._proposal = 1.0
        self._agreed: int | None = None
        self._counts_pending: dict[str, float] = {}
        self._restored_start: int | None = None  # a replacement's restored window, until it completes its own
        self.job_restorable_start = -1  # logs from here on may be needed by some stage's restore
        self._iteration = 0
        self.replicator = replicator
        self._held_over: WindowImage | None = None  # a peer's window replica, kept while groups are rebuilt
        # Expert parallelism: the stage's replicas replay together, so each keeps the newest window
        # all of them hold (-1: the initial state), and the initial state until a window is common.
        self.group_keeping = identity.expert_parallel > 1
        self.group_common = -1
        self.initial_state: object | None = None  # set by the engine; dropped once a window is common
        # Set by the engine when upstream logging is on: (start, stop) -> this stage's logs of those
        # iterations, persisted with each window so it can be replayed offline.
        self.log_exporter: Callable[[int, int], bytes] | None = None
        # Small JSON state recorded with each window as of its first capture, by name (the user's
        # LR scheduler): a replay restores it before re-running the window's iterations.
        self.window_state: dict[str, Callable[[], dict]] = {}
        self.persister = (
            AsyncPersister(Path(config.persist_dir) / identity.run_id, keep=config.keep_persisted,
                           codec=None if config.persist_codec == "none" else DeltaCodec(config.persist_codec))
            if config.persist_dir else None
        )
        # Run on the capture thread after a window is published: hand it to the slower tiers.
        self.listeners: list[Callable[[WindowImage], None]] = [replicator.offer] if replicator else []
        if self.persister is not None:
            self.listeners.append(self._persist_every_kth)

    # -- piggybacked agreement -----------------------------------------------------------------
    def begin_iteration(self, iteration: int) -> None:
        self._iteration_start, self._iteration_cpu_start = time.perf_counter(), time.thread_time()
        self._iteration = iteration

    def dp_payload(self, token_counts: dict[str, torch.Tensor]) -> torch.Tensor:
        """[W proposal, tokens per expert operator] to be summed across replicas."""
        counts = expert_counts([(layer, expert) for _, layer, expert in self._counted], token_counts)
        # Algorithm 1 is quadratic in operators: run it only where its answer is used.
        with LEDGER.blocking(PROPOSE):
            proposal = self._propose() if self._is_decision_point(self._iteration) else self._proposal
        return torch.tensor([proposal, *counts, *self._held_slots()], dtype=torch.float32)

    def absorb_dp(self, summed: torch.Tensor) -> None:
        replicas = self.identity.data_parallel
        self._proposal = math.ceil(float(summed[0]) / replicas)
        counted = len(self._counted)
        self._counts_pending = dict(zip((name for name, _, _ in self._counted), summed[1:1 + counted].tolist()))  # counted once the step commits
        if self.group_keeping:
            self._absorb_held(summed[1 + counted:].reshape(replicas, HELD_SLOTS).tolist())

    def held_starts(self) -> list[int]:
        """Windows this replica could replay from with its group, oldest first (-1: the initial state)."""
        return ([-1] if self.initial_state is not None else []) + self.shm.held_starts()

    def _held_slots(self) -> list[float]:
        """This replica's row of the held windows, in its own slots (the others' are zero in the sum)."""
        if not self.group_keeping:
            return []
        mine = sorted(self.held_starts(), reverse=True)[:HELD_SLOTS]
        row = [float(s) for s in mine] + [_NO_WINDOW] * (HELD_SLOTS - len(mine))
        slots = [0.0] * (self.identity.data_parallel * HELD_SLOTS)
        at = self.identity.replica * HELD_SLOTS
        slots[at:at + HELD_SLOTS] = row
        return slots

    def _absorb_held(self, rows: list[list[float]]) -> None:
        """The newest window every replica holds becomes common: what is older is retired."""
        common = set.intersection(*({int(v) for v in row if v != _NO_WINDOW} for row in rows))
        newest = max(common, default=-1)
        if newest <= self.group_common:
            return
        self.group_common = newest
        self.initial_state = None
        self.shm.retire_before(newest)

    def stage_payload(self) -> torch.Tensor:
        return torch.tensor([float(self._proposal), float(self.restorable_start())], dtype=torch.float32)

    def absorb_gather(self, per_stage: list[torch.Tensor]) -> None:
        self._agreed = int(max(float(v[0]) for v in per_stage))
        self.job_restorable_start = int(min(float(v[1]) for v in per_stage))
        if self.persister is not None:
            self.persister.limit_pruning(restorable_start=self.job_restorable_start, num_stages=len(per_stage))

    def restorable_start(self) -> int:
        """Start of the oldest window a restore of this stage could begin at (-1: the initial state)."""
        if self.group_keeping:
            return min(self.group_common, self._restorable_alone())
        return self._restorable_alone()

    def _restorable_alone(self) -> int:
        if self.persister is not None:
            persisted = self.persister.last_persisted
            return persisted.start_iteration if persisted is not None else -1
        if self.last_complete is not None:
            return self.last_complete.start_iteration
        return -1 if self._restored_start is None else self._restored_start

    # -- capture ---------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Call before the optimizer step: the previous capture must not see half-updated tensors."""
        with LEDGER.blocking(FENCE):
            self.worker.fence_step()

    def after_step(self, iteration: int) -> None:
        """Call right after the optimizer step of ``iteration``; raises a persist error of an earlier window."""
        if self.persister is not None:
            self.persister.raise_error()
        with LEDGER.blocking(CAPTURE):
            self._after_step(iteration)

    def _after_step(self, iteration: int) -> None:
        self._observe_iteration_time()
        for name in self._experts:
            self._popularity_now[name] += self._counts_pending.get(name, 0.0)
        self._counts_pending = {}
        if self.state is WindowState.CAPTURING:
            self._capture(iteration)
        if self._is_decision_point(iteration):
            self._start_window(iteration + 1)

    def schedule(self) -> tuple[int, int]:
        """(start, W) of the window in progress, or (-1, 0) before the first."""
        if self.state is WindowState.WAITING:
            return -1, 0
        return self.window_start, self.plan.window

    def adopt_schedule(self, *, start: int, window: int, resume: int, restored_start: int) -> None:
        """A replacement at iteration ``resume`` follows the job's window (``start``, ``window``): it
        captures it if it has not begun yet, else skips to the next. ``restored_start`` is the window
        it was restored from (-1: the initial state), its fallback until it completes one of its own."""
        self._restored_start = restored_start
        if start < 0:
            return
        self.plan = split_into_slots(self.order, window)
        self.window_start = start
        self.state = WindowState.CAPTURING if start >= resume else WindowState.SKIPPING
        log.info("joined window %d..%d (W=%d) %s", start, start + window - 1, window,
                 "from its start" if start >= resume else "mid-way: capturing from the next window")

    def refresh_window_sources(self) -> None:
        """After a survivor replayed (its optimizer state tensors were replaced), the rest of the
        window in progress copies the new tensors: the same entries, planned again."""
        window = self._window
        self.worker.fence()
        if (self.state is not WindowState.CAPTURING or window is None or window.start != self.window_start
                or window.layout is None):
            return
        fresh = plan_layout(plan=window.plan, operators=self.operators, master=self.master, compute=self.compute,
                            optimizer=self.optimizer, state=window.model_state)
        if fresh.entries != window.layout.entries:
            raise SnapshotError(f"stage {self.identity.stage}: the replayed optimizer state does not fit window "
                                f"{window.start}'s layout")
        window.layout = fresh
        self._layout, self._layout_key = fresh, None

    def abandon_iteration(self) -> None:
        """The in-flight iteration will be re-run: forget what it proposed and counted."""
        self._counts_pending = {}

    def replace_replicator(self, replicator: PeerReplicator | None) -> None:
        """After the job's groups were rebuilt: the old replicator's threads die with the old group;
        the window replica it held is kept."""
        old = self.replicator
        if old is not None:
            old.abandon()
            self.listeners.remove(old.offer)
            self._held_over = old.held() or self._held_over
        if replicator is not None:
            replicator.adopt_held(self._held_over)
            self._held_over = None
            self.listeners.insert(0, replicator.offer)
        self.replicator = replicator

    def newest_image(self) -> WindowImage | None:
        """The newest complete window of this stage replica, from shared memory (None if none)."""
        if self.last_complete is None:
            return None
        try:
            return self.shm.load_complete(verify=False)
        except SnapshotError:
            return None

    def drain(self, *, timeout_s: float) -> None:
        """Finishes the capture in flight and sends and writes every window offered so far, threads
        kept running: a rank that finished training does this before it says so, so that a failure
        in this work (a kill at the last window's capture, replication or persistence) happens while
        the other ranks still wait for it, and is recovered like any other."""
        self.worker.fence()
        if self.replicator is not None:
            self.replicator.wait_sent(timeout_s=timeout_s)
        if self.persister is not None:
            self.persister.wait()

    def close(self) -> None:
        """Finishes the capture in flight and the tiers' background work, then stops the threads."""
        self.worker.fence()
        self.worker.close()
        if self.replicator is not None:
            self.replicator.close()
        if self.persister is not None:
            self.persister.close()

    def _is_decision_point(self, iteration: int) -> bool:
        if self.state is WindowState.WAITING:
            return True  # the first after_step decides the first window
        return iteration == self.window_start + self.plan.window - 1

    def _start_window(self, start: int) -> None:
        if self._agreed is None:
            raise ConfigError("no agreed window size: absorb_gather() must run before after_step()")
        # Shares, not counts: windows of different W route different numbers of tokens.
        total = sum(self._popularity_now.values()) or 1.0
        shares = {name: count / total for name, count in self._popularity_now.items()}
        if popularity_drifted(self._popularity_used, shares,
                              change=self.config.reorder_change, fraction=self.config.reorder_fraction):
            self.order = snapshot_order(list(self.operators.values()), shares)
            self._popularity_used = shares
            log.info("expert popularity drifted: new snapshot order %s", self.order)
        self._popularity_now = {n: 0.0 for n in self._experts}
        self.plan = split_into_slots(self.order, self._agreed)
        self.window_start = start
        self.state = WindowState.CAPTURING
        log.info("window %d..%d: W=%d, operators per slot %s", start, start + self.plan.window - 1,
                 self.plan.window, "/".join(str(len(s)) for s in self.plan.slots))

    def _capture(self, iteration: int) -> None:
        """Queues capture ``i`` of the window. Everything but the queueing runs on the capture thread,
        in order: capture 0 plans the layout and maps the file, later captures and the publish step
        find them in the window's buffers."""
        i = iteration - self.window_start
        if i == 0:
            # State besides the copies, taken on the training thread after step t0: an LR scheduler's,
            # and the model's buffers and frozen parameters (cloned: training goes on meanwhile).
            extra = {name: state() for name, state in self.window_state.items()}
            model_state = {name: t.detach().clone() for name, t in state_tensors(self.master).items()}
            self._window = _WindowBuffers(self.plan, self.window_start, extra, model_state)
        window = self._window
        last = i == self.plan.window - 1
        finish = self._publisher(window, iteration) if last else None
        self.worker.submit(self._copy_jobs(window, i), then=finish)

    def _copy_jobs(self, window: "_WindowBuffers", i: int) -> Iterator[CopyJob]:
        """Capture ``i``'s (source, blob view) pairs, made lazily on the capture thread."""
        if i == 0:
            window.layout = self._layout_for(window.plan, window.model_state)
            window.blob = self.shm.new_blob(window.start, window.layout.blob_bytes, in_use=self._read_by_tiers)
            self.worker.copier.reserve(window.layout.largest_capture_bytes())
        for source, e in zip(window.layout.sources[i], window.layout.entries[i]):
            yield source, window.blob[e.offset : e.offset + e.nbytes]

    def _layout_for(self, plan: SlotPlan, model_state: dict[str, torch.Tensor]) -> WindowLayout:
        """The layout of a window with ``plan``: the previous window's when every slot holds the same
        operators (their order inside a slot does not change what a capture holds) and every source
        tensor is the same object (steady state); planned afresh otherwise (W or slot membership
        changed, or the optimizer state was replaced by a restore)."""
        state = self.optimizer.state
        sources = [id(v) for p in self._master_params if p in state for v in state[p].values()]
        sources += [id(t) for t in model_state.values()]  # fresh clones each window: no reuse with buffers
        key = (tuple(frozenset(slot) for slot in plan.slots), tuple(sources))
        if key != self._layout_key:
            self._layout = plan_layout(plan=plan, operators=self.operators, master=self.master,
                                       compute=self.compute, optimizer=self.optimizer, state=model_state)
            self._layout_key = key
        return self._layout

    def _read_by_tiers(self, blob: torch.Tensor) -> bool:
        """Whether a background tier still reads ``blob`` (a retired window), so it cannot be reused."""
        return any(tier is not None and tier.reads(blob) for tier in (self.replicator, self.persister))

    def _publisher(self, window: "_WindowBuffers", iteration: int):
        """The publish step of one window, bound to that window's own buffers: it runs on the capture
        thread while the training thread may already be starting the next window."""
        identity = self.identity

        def publish() -> None:
            plan, start, layout, blob = window.plan, window.start, window.layout, window.blob
            fault_point("capture", stage=identity.stage, replica=identity.replica, iteration=iteration)
            captures = tuple(
                Capture(start + i, with_checksums(blob, entries))
                for i, entries in enumerate(layout.entries)
            )
            manifest = WindowManifest(
                run_id=identity.run_id, job_nonce=identity.job_nonce, stage=identity.stage, replica=identity.replica,
                start_iteration=start,
                slots=plan.slots, precision=identity.precision, threads=identity.threads,
                captures=captures, blob_bytes=layout.blob_bytes,
                extra={"data_parallel": identity.data_parallel, OPERATOR_KINDS: self.kinds, **window.extra,
                       **({"expert_parallel": identity.expert_parallel} if identity.expert_parallel > 1 else {})},
            )
            self.shm.publish(manifest, keep_from=self.group_common if self.group_keeping else None)
            LEDGER.add_bytes(STORED, manifest.blob_bytes)
            self.last_complete = manifest
            self.windows_completed += 1
            image = WindowImage(manifest, blob)
            for listener in self.listeners:
                listener(image)

        return publish

    # -- measurements ---------------------------------------------------------------------------
    def _observe_iteration_time(self) -> None:
        self._iteration_seconds = _ema(self._iteration_seconds, time.perf_counter() - self._iteration_start)
        self._iteration_cpu = _ema(self._iteration_cpu, time.thread_time() - self._iteration_cpu_start)
        measured = self.worker.bandwidth
        if measured and self.config.bandwidth_gbps is None:
            self._bandwidth = _ema(self._bandwidth, measured)

    def _propose(self) -> int:
        if self.config.window is not None:
            return self.config.window
        seconds, per_byte = self._budget_rates()
        budget = capture_budget_bytes(fraction=self._budget_fraction, seconds_per_iteration=seconds,
                                      seconds_per_byte=per_byte)
        try:
            return find_window_size(self.order, full=self.full_bytes, compute=self.compute_bytes, budget_bytes=budget)
        except ConfigError:
            return max(1, len(self.order))  # the cheapest per iteration; logged by the planner's users

    def _budget_rates(self) -> tuple[float, float]:
        """(seconds per iteration, seconds per captured byte) for the budget. With CUDA, wall-clock:
        the iteration and the capture's copy throughput. On CPU, CPU-seconds: the training thread's
        per iteration, and every snapshot thread's per captured byte (capture and checksums,
        replication both ways, persistence), measured; wall time would grow with preemption on a
        loaded machine and so buy more bytes exactly when cores are scarce."""
        if self.device.type == "cuda":
            return self._iteration_seconds or (time.perf_counter() - self._iteration_start), 1 / self._bandwidth
        cpu = self._iteration_cpu or (time.thread_time() - self._iteration_cpu_start)
        if self.config.bandwidth_gbps:
            return cpu, 1 / self._bandwidth
        return cpu, cpu_seconds_per_captured_byte(self._background_work(), first_guess=self._probed_cpu_per_byte)

    def _background_work(self) -> list[BackgroundWork]:
        work = [self.worker.work()]
        if self.replicator is not None:
            work += self.replicator.work()
        if self.persister is not None:
            work.append(self.persister.work(share=1 / self.config.persist_every))
        return work

    def tier_bytes(self) -> dict[str, int]:
        """Bytes each tier holds for this stage replica (``peer``: the replica it keeps for another)."""
        return {
            "shm": self.shm.bytes_held(),
            "peer": self.replicator.bytes_held() if self.replicator else 0,
            "disk": self.persister.bytes_on_disk if self.persister else 0,
        }

    def _persist_every_kth(self, image: WindowImage) -> None:
        if self.windows_completed % self.config.persist_every == 0:
            m = image.manifest
            logs = self.log_exporter(m.start_iteration, m.end_iteration + 1) if self.log_exporter else None
            self.persister.submit(image, logs=logs)


@dataclass
class _WindowBuffers:
    """One window's plan, and the layout and file its first capture job sets up on the capture thread."""

    plan: SlotPlan
    start: int
    extra: dict[str, dict]  # window_state taken at the window's first capture
    model_state: dict[str, torch.Tensor]  # buffers and frozen parameters at the window's first capture
    layout: WindowLayout | None = None
    blob: torch.Tensor | None = None


def _device_of(module: nn.Module) -> torch.device:
    """The device of the stage's parameters (the CPU for a stage without any)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _probe_capture(module: nn.Module) -> tuple[float, float]:
    """Copying and checksumming this stage's weights once, as a capture does: (bytes per wall second,
    CPU-seconds per byte), the first guesses of snapshot speed and cost until captures measure them."""
    params = [p.detach() for p in module.parameters()]
    total = sum(p.numel() * p.element_size() for p in params) or 1
    scratch = torch.empty(total, dtype=torch.uint8)
    start, cpu = time.perf_counter(), time.thread_time()
    offset = 0
    for p in params:
        n = p.numel() * p.element_size()
        view = scratch[offset : offset + n]
        view.copy_(p.reshape(-1).view(torch.uint8))
        checksum(view)
        offset += n
    return total / max(time.perf_counter() - start, 1e-9), max(time.thread_time() - cpu, 1e-9) / total


def _ema(average: float | None, newest: float) -> float:
    return newest if average is None else _EMA * newest + (1 - _EMA) * average


def _counted_experts(master: nn.Module, operators: list[Operator]) -> list[tuple[str, str, int]]:
    """(name, layer, expert index) of the expert operators in stage order, with a sharded MoE layer's
    block widened to all its experts (global names), so that the list is the same on every replica."""
    from moetion.moe import MoELayer

    counted: list[tuple[str, str, int]] = []
    widened: set[str] = set()
    for op in operators:
        if op.kind != "expert":
            continue
        layer = master.get_submodule(op.layer) if op.layer else master
        if isinstance(layer, MoELayer) and layer.shard.size > 1:
            if op.layer not in widened:
                widened.add(op.layer)
                prefix = f"{op.layer}." if op.layer else ""
                counted += [(f"{prefix}experts.{e}", op.layer, e) for e in range(layer.num_experts)]
        else:
            counted.append((op.name, op.layer, op.expert))
    return counted
