"""Joining the job: process-group initialisation from torchrun-style env vars, and the groups.

Every rank creates every group in the same order (``new_group`` is collective), then keeps only
those it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from moetion import env
from moetion import failure_notice
from moetion.control import ControlPlane
from moetion.errors import ConfigError
from moetion.topology import PipeTopology


@dataclass
class DistContext:
    """This rank's place in the job and the process groups it communicates over."""

    rank: int
    local_world_size: int
    topology: PipeTopology
    device: torch.device
    pipeline_group: dist.ProcessGroup | None = None
    data_group: dist.ProcessGroup | None = None
    tied_groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    replication_group: dist.ProcessGroup | None = None
    expert_group: dist.ProcessGroup | None = None  # this rank's expert-parallel group (ep_size > 1)
    expert_data_group: dist.ProcessGroup | None = None  # replicas holding the same experts (> 1 of them)

    @property
    def stage(self) -> int:
        return self.topology.stage_of(self.rank)

    @property
    def replica(self) -> int:
        return self.topology.replica_of(self.rank)

    def neighbour(self, offset: int) -> int | None:
        """Global rank of the stage ``offset`` away in this pipeline, or None past an end."""
        stage = self.stage + offset
        if not 0 <= stage < self.topology.num_stages:
            return None
        return self.topology.rank(stage=stage, replica=self.replica)


def init_process_group(*, timeout_s: float) -> None:
    """Joins the job described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, if not joined yet.

    The backend follows ``MOETION_DEVICE`` (:func:`placement`). ``timeout_s`` bounds every collective.
    """
    if dist.is_initialized():
        return
    missing = env.missing_rendezvous()
    if missing:
        raise ConfigError(
            f"environment variables {missing} are not set: start training with `moetion launch` "
            "or `torchrun`, or call torch.distributed.init_process_group yourself first"
        )
    dist.init_process_group(_backend(), init_method="env://", timeout=timedelta(seconds=timeout_s))


def join_job(control: ControlPlane, generation: int, *, timeout_s: float) -> bool:
    """Joins the job's process group of ``generation`` (under a supervisor); False when a newer
    generation was published before every rank arrived (a rank of this one died first)."""
    where = env.rank_env()
    rank, world = where.rank, where.world_size
    if not control.arrive(generation, rank, world, timeout_s=timeout_s):
        return False
    failure_notice.joining(generation)  # the sockets that appear from here on are this generation's groups
    dist.init_process_group(_backend(), store=control.group_store(generation), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return True


def leave_process_group() -> None:
    failure_notice.disarm()  # before the groups' descriptors close and may be reused
    if dist.is_initialized():
        dist.destroy_process_group()


def _backend() -> str:
    return placement(local_rank=0)[0]


def placement(*, local_rank: int) -> tuple[str, torch.device]:
    """(backend, device) of a rank, from ``MOETION_DEVICE``: auto (NCCL on GPU ``local_rank`` where
    CUDA is available, else gloo on the CPU), cpu, cuda, or cuda-shared (every rank computes on GPU
    0 and the ranks talk over gloo: several ranks on a one-GPU machine, for testing)."""
    mode = env.device_mode()
    if mode == "auto":
        mode = "cuda" if torch.cuda.is_available() else "cpu"
    if mode == "cpu":
        return "gloo", torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{env.DEVICE}={mode} needs a CUDA device, but torch.cuda.is_available() is False: "
                          "unset it or set it to cpu")
    if mode == "cuda-shared":
        return "gloo", torch.device("cuda", 0)
    return "nccl", torch.device("cuda", local_rank)


def new_expert_groups(topology: PipeTopology, rank: int) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Creates every stage's expert-parallel and expert-data-parallel groups (collective: every rank
    calls it); returns this rank's (None where it has none)."""
    expert_group = expert_data_group = None
    if topology.expert_parallel == 1:
        return None, None
    for stage in range(topology.num_stages):
        for group_index in range(topology.expert_data_parallel):
            ranks = topology.expert_group_ranks(stage, group_index)
            group = dist.new_group(ranks)
            if rank in ranks:
                expert_group = group
        if topology.expert_data_parallel > 1:
            for expert_rank in range(topology.expert_parallel):
                ranks = topology.expert_data_ranks(stage, expert_rank)
                group = dist.new_group(ranks)
                if rank in ranks:
                    expert_data_group = group
    return expert_group, expert_data_group


def build_context(*, num_stages: int, tied_stages: dict[str, list[int]], replication: bool = False,
                  expert_parallel: int = 1) -> DistContext:
    """Creates the pipeline, data-parallel, expert-parallel and tied-weight groups for this rank,
    and with ``replication`` a world-wide gloo group that only snapshot replication uses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    topology = PipeTopology.from_world(world_size=world, num_stages=num_stages, expert_parallel=expert_parallel)
    where = env.rank_env() if env.has_rendezvous() else None  # a group the user initialised may have none
    local_world = where.local_world_size if where else world
    _, device = placement(local_rank=where.local_rank if where else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context = DistContext(rank=rank, local_world_size=local_world, topology=topology, device=device)
    for replica in range(topology.data_parallel):
        group = dist.new_group(topology.pipeline_ranks(replica))
        if replica == context.replica:
            context.pipeline_group = group
    for stage in range(num_stages):
        group = dist.new_group(topology.replica_ranks(stage))
        if stage == context.stage:
            context.data_group = group
    context.expert_group, context.expert_data_group = new_expert_groups(topology, rank)
    for key, stages in tied_stages.items():
        for replica in range(topology.data_parallel):
            ranks = [topology.rank(stage=s, replica=replica) for s in stages]
            group = dist.new_group(ranks)
            if rank in ranks:
                context.tied_groups[key] = group
    if replication:
        context.replication_group = dist.new_group(list(range(world)), backend="gloo")
    failure_notice.joined()
    return context
