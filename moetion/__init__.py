"""moetion: fault-tolerant pipeline-parallel Mixture-of-Experts training.

Typical use, in a script started by ``moetion launch`` or ``torchrun``::

    module = moetion.PipelineModule(layers=[...], num_stages=4, loss_fn=loss)
    engine = moetion.initialize(module, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                                config={"micro_batches": 4})
    for _ in range(iterations):
        loss = engine.train_batch(data)
"""
from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from moetion import env
from moetion import log as _log
from moetion.config import Config, LRScheduleConfig
from moetion.data import ByteCorpus, DataSource, TensorDataSource
from moetion import failure_notice
from moetion.dataset_source import DatasetSource
from moetion.data_iter import DataExhausted
from moetion.prefetch import PrefetchingSource
from moetion.token_file import token_file_source
from moetion.control import ControlPlane, start_generation, supervised
from moetion.determinism import check_device, enable_strict_mode
from moetion.distributed import build_context, init_process_group, join_job, leave_process_group
from moetion.engine import IterationStats, PipelineEngine
from moetion.errors import ConfigError, DataError, LaunchError, MoetionError, PartitionError, PeerFailure
from moetion.experts import ExpertLayout, experts
from moetion.lr_scheduler import SchedulerSpec, build_lr_scheduler
from moetion.module import LayerSpec, PipelineModule, TiedLayerSpec
from moetion.moe import attach_aux_loss
from moetion.operators import describe_kinds, discover_operators, kind_counts
from moetion.routing import report_token_counts
from moetion.run_identity import resume_requested
from moetion.threads import pin_threads
from moetion.timeouts import check_rank
from moetion.topology import PipeTopology

__all__ = [
    "ByteCorpus",
    "Config",
    "ConfigError",
    "DataError",
    "DataExhausted",
    "DataSource",
    "DatasetSource",
    "ExpertLayout",
    "IterationStats",
    "LaunchError",
    "LayerSpec",
    "LRScheduleConfig",
    "MoetionError",
    "PartitionError",
    "PeerFailure",
    "PipelineEngine",
    "PipelineModule",
    "PrefetchingSource",
    "TensorDataSource",
    "TiedLayerSpec",
    "attach_aux_loss",
    "experts",
    "initialize",
    "report_token_counts",
    "token_file_source",
    "resume_requested",
]

_log_module = logging.getLogger(__name__)


def initialize(
    module: PipelineModule,
    *,
    optimizer: torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
    config: Config | Mapping[str, Any] | str | Path | None = None,
    lr_scheduler: SchedulerSpec | None = None,
) -> PipelineEngine:
    """Joins the job, pins this rank's threads, and returns the engine for this stage.

    Args:
        module: this rank's :class:`PipelineModule` (built with the job's ``num_stages``).
        optimizer: an optimizer over ``module.parameters()``, or a factory taking the parameters.
        config: a :class:`Config`, a dict of its keys, or the path of a JSON file.
        lr_scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` built on ``optimizer``, or a factory
            taking the optimizer (needed when ``optimizer`` is a factory). It steps once per committed
            iteration (``ReduceLROnPlateau`` with the iteration's loss) and is recovered exactly; it
            replaces the ``lr_schedule`` config, which must then stay at its default.
    """
    config = _as_config(config)
    enable_strict_mode(config.determinism)
    if module.loss_fn is None and module.is_last_stage:
        raise ConfigError("the last stage needs a loss: pass PipelineModule(..., loss_fn=...)")
    _check_expert_parallel(module, config)
    control, generation = _join(config)
    context = build_context(
        num_stages=module.num_stages,
        tied_stages=module.tied_stages(),
        replication=config.snapshot.enabled and config.snapshot.replicate,
        expert_parallel=module.ep_size,
    )
    if context.stage != module.stage_id:
        raise ConfigError(
            f"rank {context.rank} runs stage {context.stage} but the module was built for stage "
            f"{module.stage_id}: build PipelineModule without stage_id under a launcher"
        )
    _log.configure(rank=context.rank, stage=context.stage)
    threads = pin_threads(config.threads, local_world_size=context.local_world_size)
    module.to(context.device)
    check_device(config.determinism, context.device)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(module.parameters())
    scheduler = build_lr_scheduler(lr_scheduler, optimizer, config.lr_schedule)
    _log_module.info(
        "stage %d/%d replica %d/%d: layers %d..%d, %d parameters, %s, %d intra-op threads, %s",
        context.stage, module.num_stages, context.replica, context.topology.data_parallel,
        module.parts[context.stage], module.parts[context.stage + 1] - 1,
        sum(p.numel() for p in module.parameters()), describe_kinds(kind_counts(discover_operators(module))),
        threads, config.precision,
    )
    return PipelineEngine(module=module, optimizer=optimizer, config=config, dist_context=context, threads=threads,
                          control=control, generation=generation, replacement=start_generation() > 0,
                          lr_scheduler=scheduler)


def _check_expert_parallel(module: PipelineModule, config: Config) -> None:
    """Bad expert-parallel settings fail here, before any process group is created."""
    world = env.world_size_or_none()
    if module.ep_size > 1 and world is not None:
        PipeTopology.from_world(world_size=world, num_stages=module.num_stages, expert_parallel=module.ep_size)


def _join(config: Config) -> tuple[ControlPlane | None, int]:
    """Joins the job: through the control plane under moetion's supervisor (so that failures can be
    recovered from), else through torchrun's env:// rendezvous."""
    if not supervised():
        init_process_group(timeout_s=config.peer_timeout_s)
        return None, 0
    check_rank(peer_timeout_s=config.peer_timeout_s)
    control = ControlPlane.from_env(timeout_s=config.peer_timeout_s)
    # The group's store is a Python object (values are signed): tear the group down while the
    # interpreter still runs, not in C++ static destructors after it has finalized (which hangs).
    atexit.register(leave_process_group)
    generation = start_generation()
    # Both open their store connections before any group exists: the notice never shuts them.
    rank = env.rank_env().rank
    control.start_heartbeat(rank, generation)
    failure_notice.start(control, rank)
    while not join_job(control, generation, timeout_s=config.peer_timeout_s):
        generation = control.generation()  # superseded while starting: join the newest
    return control, generation


def _as_config(config: Config | Mapping[str, Any] | str | Path | None) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, Path)):
        return Config.from_json(config)
    return Config.from_dict(config)
