"""The pipeline engine: runs a stage's 1F1B instruction stream, one iteration per ``train_batch``.

The data path of one iteration, top to bottom: load or receive a micro-batch's input, forward
(under a step context that keys its random draws), send the output on; receive the output's
gradient, backward, send the input's gradient back; then sum tied gradients, average across
replicas, and take the optimizer step behind the global grad-norm exchange (the commit point).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from logging_store import LogStoreConfig

from moetion import gradients, schedule
from moetion.config import Config
from moetion.data import DataSource
from moetion.control import ControlPlane
from moetion.distributed import DistContext, build_context, join_job, leave_process_group
from moetion.errors import ConfigError, DataError, PeerFailure
from moetion.faults import fault_point
from moetion.lr_schedule import apply_lr
from moetion.metrics import open_rank_metrics
from moetion.module import PipelineModule
from moetion.moe import MoELayer
from moetion.p2p import StageLinks
from moetion.precision import StagePrecision
from moetion.random import StepContext, step_context
from moetion.recovery import Recovery
from moetion.harness.final_state import record_final_state
from moetion.replay import newest_common_window, persisted_neighbour_logs, replay_stage
from moetion.snapshot.persist import load_persisted
from moetion.snapshot.checkpointer import SparseCheckpointer, StageIdentity, run_id
from moetion.snapshot.replica import PeerReplicator, replication_peers
from moetion.upstream_log import IterationScalars, UpstreamLog

log = logging.getLogger(__name__)


@dataclass
class _MicroBatchBuffers:
    """Tensors alive between a micro-batch's instructions, keyed by micro-batch index."""

    loss_sum: torch.Tensor
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    labels: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    input_grads: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class IterationStats:
    """What one ``train_batch`` produced; ``loss`` is the mean over micro-batches and replicas."""

    iteration: int
    loss: float
    grad_norm: float
    clip_coef: float
    lr_factor: float
    seconds: float


class PipelineEngine:
    """Trains one pipeline stage; create it with :func:`moetion.initialize`."""

    def __init__(
        self,
        *,
        module: PipelineModule,
        optimizer: torch.optim.Optimizer,
        config: Config,
        dist_context: DistContext,
        threads: int,
        control: ControlPlane | None = None,
        generation: int = 0,
        replacement: bool = False,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.config = config
        self.threads = threads
        self.iteration = 0
        self.last_stats: IterationStats | None = None
        self.losses: dict[int, float] = {}  # every iteration's loss this process saw commit
        self.iteration_started_at = time.time()
        self.precision = StagePrecision(module, config.precision)
        self.dist = dist_context
        self.checkpointer = self._build_checkpointer() if config.snapshot.enabled else None
        if self.checkpointer is not None and not replacement:
            self.checkpointer.shm.clear()  # a replacement restores from these; anyone else starts afresh
        self.upstream = self._build_upstream_log() if config.upstream_log.enabled else None
        self._connect(dist_context)
        self.metrics = open_rank_metrics(self)  # None unless config.metrics.dir is set
        # Under a supervisor a lost peer is recovered from; a process started into a later
        # generation is a replacement and restores its stage before its first iteration.
        self.recovery = None if control is None else Recovery(
            self, control, generation=generation, needs_restore=replacement)
        self.last_token_counts: dict[str, torch.Tensor] = {}
        self._moe_layers = [(n, m) for n, m in self.precision.compute.named_modules() if isinstance(m, MoELayer)]
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._norm_params = self._params_counted_in_norm()
        self._dispatch: dict[type[schedule.Instruction], Callable[[int | None], None]] = {
            schedule.LoadMicroBatch: self._load_micro_batch,
            schedule.RecvActivation: self._recv_activation,
            schedule.ForwardPass: self._forward,
            schedule.SendActivation: self._send_activation,
            schedule.RecvGrad: self._recv_grad,
            schedule.BackwardPass: self._backward,
            schedule.SendGrad: self._send_grad,
            schedule.ReduceTiedGrads: self._reduce_tied_grads,
            schedule.ReduceGrads: self._reduce_grads,
            schedule.OptimizerStep: self._optimizer_step,
        }

    @property
    def stage(self) -> int:
        return self.module.stage_id

    def train_batch(self, data: DataSource) -> float:
        """Runs iteration ``self.iteration`` over ``config.micro_batches`` micro-batches.

        Returns the iteration's mean loss (over micro-batches and data-parallel replicas), the
        same value on every rank. The optimizer step is the commit point: when this returns,
        every rank of the job has applied the same iteration. In a replacement (under the
        supervisor) the first call instead restores the stage to the job's iteration and returns
        the loss of the last committed one: drive the loop with ``engine.iteration``.
        """
        if self.recovery is not None and self.recovery.needs_restore:
            self.recovery.restore(data)
            if self.last_stats is not None:
                return self.last_stats.loss  # the job's last committed iteration: the caller re-checks its loop
        while True:
            try:
                return self._run_iteration(data)
            except PeerFailure as failure:
                if self.recovery is None:
                    raise
                cause = str(failure)
            # Outside the except block: a live traceback would keep the broken group's sockets open.
            self.recovery.after_failure(cause, data)

    def _run_iteration(self, data: DataSource) -> float:
        self.iteration_started_at = time.time()
        start = time.perf_counter()
        self._data = data
        self._mb = _MicroBatchBuffers(loss_sum=torch.zeros((), dtype=torch.float32, device=self.dist.device))
        self.optimizer.zero_grad(set_to_none=True)
        if self.checkpointer is not None:
            self.checkpointer.begin_iteration(self.iteration)
        for instruction in schedule.train_schedule(
            stage=self.stage, num_stages=self.module.num_stages, micro_batches=self.config.micro_batches
        ):
            self._dispatch[type(instruction)](instruction.micro_batch)
        self.last_stats.seconds = time.perf_counter() - start
        self.losses[self.iteration] = self.last_stats.loss
        if self.metrics is not None:
            self.metrics.after_commit(self)
        self.iteration += 1
        return self.last_stats.loss

    def expert_token_counts(self) -> dict[str, torch.Tensor]:
        """Tokens this replica routed to each expert of each MoE layer on this stage in the last
        iteration, keyed by the layer's name in the stage module (its name in the whole model)."""
        return dict(self.last_token_counts)

    def load_checkpoint(self, data: DataSource, root: str | Path | None = None) -> int:
        """Whole-job restart: rebuilds this stage from the newest window persisted by every stage.

        Call on every rank right after :func:`moetion.initialize`, before training. Each stage replays
        its window from disk with its neighbours' persisted logs (the same conversion as the offline
        converter), so training continues bit-identically to a run that never stopped. ``root``
        defaults to ``snapshot.persist_dir/<run_id>``. Returns the iteration training continues at.
        """
        if root is None:
            if not self.config.snapshot.persist_dir:
                raise ConfigError("load_checkpoint needs snapshot.persist_dir (or an explicit root)")
            root = Path(self.config.snapshot.persist_dir) / run_id(self.config.snapshot)
        root = Path(root)
        replicas, replica = self.dist.topology.data_parallel, self.dist.replica
        start = newest_common_window(root, num_stages=self.module.num_stages, data_parallel=replicas)
        window = load_persisted(root, stage=self.stage, replica=replica, iteration=start)
        with persisted_neighbour_logs(root, module=self.module, start_iteration=start, replica=replica) as logs:
            replay_stage(module=self.module, optimizer=self.optimizer, config=self.config, window=window,
                         logs=logs, data=data, until=window.manifest.end_iteration, precision=self.precision,
                         replica_group=self.dist.data_group if replicas > 1 else None)
        self.iteration = window.manifest.end_iteration + 1
        log.info("restarted from window %d..%d under %s; continuing at iteration %d",
                 start, window.manifest.end_iteration, root, self.iteration)
        return self.iteration

    def close(self) -> None:
        """Waits for background snapshot work and stops its threads (and, under the fault harness,
        leaves this rank's final state for it to compare). Under the supervisor it first waits for
        every rank to finish, serving the restore of one lost after the last commit."""
        if self.recovery is not None:
            self.recovery.finish()
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.upstream is not None:
            self.upstream.close()
        if self.metrics is not None:
            self.metrics.close()
        record_final_state(self)

    # -- membership (recovery) ---------------------------------------------------------------------
    def history(self) -> dict[int, IterationScalars]:
        """The committed iterations this process saw: their losses, and the last one's decisions."""
        nan = float("nan")
        scalars = {t: IterationScalars(nan, nan, nan, loss) for t, loss in self.losses.items()}
        if self.last_stats is not None:
            s = self.last_stats
            scalars[s.iteration] = IterationScalars(s.lr_factor, s.grad_norm, s.clip_coef, s.loss)
        return scalars

    def adopt_history(self, scalars: dict[int, IterationScalars]) -> None:
        """A restored stage takes over the losses and last statistics of iterations it did not run."""
        if not scalars:
            return
        for t, s in scalars.items():
            self.losses[t] = s.loss
        t = max(scalars)
        s = scalars[t]
        self.last_stats = IterationStats(t, s.loss, s.grad_norm, s.clip_coef, s.lr_factor, 0.0)

    def abandon_iteration(self) -> None:
        """Forgets the in-flight iteration; the committed state (weights, optimizer) is untouched."""
        self._mb = None
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.discard_grads()
        self._pop_token_counts()
        if self.upstream is not None:
            self.upstream.drop_from(self.iteration)
        if self.checkpointer is not None:
            self.checkpointer.abandon_iteration()

    def leave_group(self) -> None:
        """Tears down this rank's process groups (threads blocked in them fail and exit)."""
        if self.checkpointer is not None:
            self.checkpointer.replace_replicator(None)
        self.links = None  # its pending sends hold the group's sockets open; neighbours must see them close
        self.dist = replace(self.dist, pipeline_group=None, data_group=None, tied_groups={}, replication_group=None)
        leave_process_group()

    def join_group(self, control: ControlPlane, generation: int) -> bool:
        """Joins the job's process group of ``generation``; False if a newer one superseded it first."""
        if not join_job(control, generation, timeout_s=self.config.peer_timeout_s):
            return False
        self._connect(build_context(num_stages=self.module.num_stages, tied_stages=self.module.tied_stages(),
                                    replication=self.config.snapshot.enabled and self.config.snapshot.replicate))
        return True

    def _connect(self, context: DistContext) -> None:
        self.dist = context
        self.links = StageLinks(prev_rank=context.neighbour(-1), next_rank=context.neighbour(+1),
                                timeout_s=self.config.peer_timeout_s, device=context.device)
        if self.checkpointer is not None:
            self.checkpointer.replace_replicator(self._build_replicator())

    # -- micro-batch instructions ------------------------------------------------------------------
    def _global_index(self, m: int) -> int:
        return self.dist.replica * self.config.micro_batches + m

    def _load_micro_batch(self, m: int | None) -> None:
        try:
            inputs, labels = self._data.micro_batch(self.iteration, self._global_index(m))
        except DataError:
            raise
        except Exception as error:
            raise DataError(
                f"data source failed for iteration {self.iteration}, micro-batch {self._global_index(m)}: {error}"
            ) from error
        device = self.dist.device
        if self.module.is_first_stage:
            self._mb.inputs[m] = inputs.to(device)
        if self.module.is_last_stage:
            self._mb.labels[m] = labels.to(device)

    def _recv_activation(self, m: int | None) -> None:
        x = self.links.recv_activation(what=self._what("activation", m))
        self._mb.inputs[m] = x.requires_grad_(x.is_floating_point())

    def _forward(self, m: int | None) -> None:
        self._fault_point("forward")
        context = StepContext(
            seed=self.config.seed,
            iteration=self.iteration,
            micro_batch=self._global_index(m),
            loss_scale=1.0 / self.config.micro_batches,
        )
        with step_context(context):
            out = self.precision.compute(self._mb.inputs[m])
        if self.module.is_last_stage:
            loss = self.module.loss_fn(out, self._mb.labels.pop(m))
            self._mb.loss_sum += loss.detach().float()
            out = loss / self.config.micro_batches
        self._mb.outputs[m] = out

    def _send_activation(self, m: int | None) -> None:
        activation = self._mb.outputs[m].detach()
        self.links.send_activation(activation, what=self._what("activation", m))
        if self.upstream is not None:
            self.upstream.log_activation(self.iteration, m, activation)

    def _recv_grad(self, m: int | None) -> None:
        self._mb.output_grads[m] = self.links.recv_grad(self._mb.outputs[m], what=self._what("gradient", m))

    def _backward(self, m: int | None) -> None:
        self._fault_point("backward")
        out = self._mb.outputs.pop(m)
        if out.requires_grad:
            torch.autograd.backward(out, grad_tensors=self._mb.output_grads.pop(m, None))
        self.precision.after_backward()
        x = self._mb.inputs.pop(m)
        if not self.module.is_first_stage:
            self._mb.input_grads[m] = x.grad if x.grad is not None else torch.zeros_like(x)

    def _send_grad(self, m: int | None) -> None:
        grad = self._mb.input_grads.pop(m)
        self.links.send_grad(grad, what=self._what("gradient", m))
        if self.upstream is not None:
            self.upstream.log_gradient(self.iteration, m, grad)

    # -- per-iteration instructions -----------------------------------------------------------------
    def _reduce_tied_grads(self, _: int | None) -> None:
        self.links.wait_sends()
        gradients.fill_missing_grads(self._params)
        for key, group in self.dist.tied_groups.items():
            for p in self.module.tied[key].parameters():
                self._collective(dist.all_reduce, p.grad, group=group, what=f"summing tied weight {key!r}")
            if self.upstream is not None:
                self.upstream.log_tied_grads(self.iteration, key, [p.grad for p in self.module.tied[key].parameters()])

    def _reduce_grads(self, _: int | None) -> None:
        """Averages gradients across replicas; the loss and the checkpointer's proposal ride along."""
        self.last_token_counts = self._pop_token_counts()
        extra = [self._mb.loss_sum.reshape(1)]
        if self.checkpointer is not None:
            extra.append(self.checkpointer.dp_payload(self.last_token_counts).to(self.dist.device))
        replicas = self.dist.topology.data_parallel
        if replicas > 1:
            flat = gradients.flatten_grads(self._params, extra)
            self._collective(dist.all_reduce, flat, group=self.dist.data_group, what="averaging gradients")
            rest = gradients.unflatten_mean(self._params, flat, replicas=replicas)
            extra = [rest[:1], rest[1:]]
        self._mb.loss_sum = extra[0][0]
        if self.checkpointer is not None:
            self.checkpointer.absorb_dp(extra[1].cpu())

    def _optimizer_step(self, _: int | None) -> None:
        """Global grad-norm (the commit point), clip, LR, step, then capture the snapshot."""
        parts = [gradients.squared_norm(self._norm_params, device=self.dist.device).reshape(1), self._mb.loss_sum.reshape(1)]
        if self.checkpointer is not None:
            parts.append(self.checkpointer.stage_payload().to(self.dist.device))
        mine = torch.cat(parts)
        gathered = [torch.empty_like(mine) for _ in range(self.module.num_stages)]
        self._collective(dist.all_gather, gathered, mine, group=self.dist.pipeline_group, what="exchanging grad norms")
        norm = gradients.total_norm([g[0] for g in gathered])
        coef = gradients.clip_coefficient(norm, self.config.grad_clip)
        gradients.scale_grads(self._params, coef)
        factor = apply_lr(self.optimizer, self.config.lr_schedule, self.iteration)
        loss = float(gathered[-1][1]) / (self.config.micro_batches * self.dist.topology.data_parallel)
        if self.upstream is not None:
            scalars = IterationScalars(lr_factor=factor, grad_norm=float(norm), clip_coef=coef, loss=loss)
            self.upstream.log_scalars(self.iteration, scalars)
        if self.checkpointer is not None:
            self.checkpointer.absorb_gather([g[2:].cpu() for g in gathered])
            self.checkpointer.before_step()
        self._fault_point("step")
        self.optimizer.step()
        self.precision.after_step()
        if self.checkpointer is not None:
            self.checkpointer.after_step(self.iteration)
            if self.upstream is not None and self.checkpointer.job_restorable_start >= 0:
                # Every stage's restore starts at or after this: older logs are dead.
                self.upstream.drop_before(self.checkpointer.job_restorable_start)
        self.last_stats = IterationStats(self.iteration, loss, float(norm), coef, factor, 0.0)

    # -- helpers -------------------------------------------------------------------------------------
    def _pop_token_counts(self) -> dict[str, torch.Tensor]:
        return {name: layer.pop_token_counts() for name, layer in self._moe_layers}

    def _build_upstream_log(self) -> UpstreamLog:
        settings = self.config.upstream_log
        store = LogStoreConfig(codec=settings.codec, level=settings.level, shuffle=settings.shuffle,
                               budget_bytes=settings.budget_bytes, spill_dir=settings.spill_dir)
        log_ = UpstreamLog(stage=self.stage, store_config=store)
        self.checkpointer.log_exporter = log_.export
        return log_

    def _build_checkpointer(self) -> SparseCheckpointer:
        identity = StageIdentity(
            run_id=run_id(self.config.snapshot), stage=self.stage, replica=self.dist.replica,
            data_parallel=self.dist.topology.data_parallel, threads=self.threads, precision=self.config.precision,
        )
        if self.config.snapshot.persist_dir and self.dist.rank == 0:
            _write_run_config(Path(self.config.snapshot.persist_dir) / identity.run_id, self.config)
        return SparseCheckpointer(master=self.module, compute=self.precision.compute, optimizer=self.optimizer,
                                  config=self.config.snapshot, identity=identity)

    def _build_replicator(self) -> PeerReplicator | None:
        peers = replication_peers(self.dist.topology, self.dist.rank)
        if self.dist.replication_group is None or peers is None:
            return None
        return PeerReplicator(group=self.dist.replication_group, send_to=peers[0], receive_from=peers[1],
                              stage=self.stage, replica=self.dist.replica)

    def _params_counted_in_norm(self) -> list[torch.nn.Parameter]:
        """This stage's parameters, minus tied copies whose norm another stage counts."""
        skip = {
            id(p)
            for key in self.dist.tied_groups
            if self.module.tied_parameter_owner(key) != self.stage
            for p in self.module.tied[key].parameters()
        }
        return [p for p in self._params if id(p) not in skip]

    def _collective(self, op: Callable[..., object], *args: object, group: dist.ProcessGroup | None, what: str) -> None:
        try:
            op(*args, group=group)
        except RuntimeError as error:
            raise PeerFailure(
                f"stage {self.stage} (rank {self.dist.rank}) lost a peer while {what} in iteration "
                f"{self.iteration}: {str(error).splitlines()[0]}"
            ) from None

    def _fault_point(self, phase: str) -> None:
        fault_point(phase, stage=self.stage, replica=self.dist.replica, iteration=self.iteration)

    def _what(self, kind: str, m: int | None) -> str:
        return f"{kind} of micro-batch {m}, iteration {self.iteration} (stage {self.stage}, rank {self.dist.rank})"


RUN_CONFIG = "config.json"


def _write_run_config(root: Path, config: Config) -> None:
    """The job's config beside its persisted windows: offline replay must use exactly these settings."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{RUN_CONFIG}.tmp"
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, root / RUN_CONFIG)
