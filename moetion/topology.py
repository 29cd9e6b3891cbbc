"""Rank <-> (stage, replica) coordinates for pipeline x data parallelism, with expert parallelism.

Ranks are laid out stage-major, replica-minor (``rank = stage * data_parallel + replica``), as in
DeepSpeed: the replicas of one stage sit on neighbouring ranks, so the heavy data-parallel
gradient all-reduce stays within a host when hosts hold consecutive ranks.

With ``expert_parallel = E`` the replicas of a stage form expert-parallel groups of ``E``
*consecutive* replicas (replica ``r`` is expert rank ``r % E`` of group ``r // E``), so the
all-to-all of every MoE layer also stays on neighbouring ranks; replicas with the same expert rank
form the expert-data-parallel group that averages those experts' gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

from moetion.errors import ConfigError


@dataclass(frozen=True)
class PipeTopology:
    num_stages: int
    data_parallel: int = 1
    expert_parallel: int = 1

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.data_parallel < 1 or self.expert_parallel < 1:
            raise ConfigError(
                f"num_stages, data_parallel and expert_parallel must be >= 1, got {self.num_stages}, "
                f"{self.data_parallel} and {self.expert_parallel}"
            )
        if self.data_parallel % self.expert_parallel != 0:
            raise ConfigError(
                f"ep_size={self.expert_parallel} does not divide the {self.data_parallel} data-parallel replicas "
                "of a stage: launch num_stages x (ep_size x expert-data-parallel) processes"
            )

    @classmethod
    def from_world(cls, *, world_size: int, num_stages: int, expert_parallel: int = 1) -> "PipeTopology":
        """The topology implied by a world size; it must be stages x replicas exactly."""
        if num_stages < 1:
            raise ConfigError(f"num_stages must be >= 1, got {num_stages}")
        if world_size % num_stages != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by num_stages={num_stages}: "
                "launch (pipeline stages x data-parallel replicas) processes"
            )
        return cls(num_stages=num_stages, data_parallel=world_size // num_stages, expert_parallel=expert_parallel)

    @property
    def world_size(self) -> int:
        return self.num_stages * self.data_parallel

    def rank(self, *, stage: int, replica: int) -> int:
        if not (0 <= stage < self.num_stages and 0 <= replica < self.data_parallel):
            raise ConfigError(f"(stage={stage}, replica={replica}) lies outside {self}")
        return stage * self.data_parallel + replica

    def stage_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.data_parallel

    def replica_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank % self.data_parallel

    def replica_ranks(self, stage: int) -> list[int]:
        """Ranks holding a copy of ``stage``: its data-parallel group."""
        return [self.rank(stage=stage, replica=r) for r in range(self.data_parallel)]

    def pipeline_ranks(self, replica: int) -> list[int]:
        """Ranks of one full pipeline, in stage order."""
        return [self.rank(stage=s, replica=replica) for s in range(self.num_stages)]

    @property
    def expert_data_parallel(self) -> int:
        """Copies of each expert per stage: the replicas over the expert-parallel group size."""
        return self.data_parallel // self.expert_parallel

    def expert_rank_of(self, rank: int) -> int:
        """This rank's place in its expert-parallel group (which block of experts it owns)."""
        return self.replica_of(rank) % self.expert_parallel

    def expert_group_ranks(self, stage: int, group: int) -> list[int]:
        """The ranks of ``stage``'s expert-parallel group ``group``: consecutive replicas."""
        first = group * self.expert_parallel
        return [self.rank(stage=stage, replica=first + e) for e in range(self.expert_parallel)]

    def expert_data_ranks(self, stage: int, expert_rank: int) -> list[int]:
        """The ranks of ``stage`` holding the same experts (one per expert-parallel group)."""
        return [self.rank(stage=stage, replica=g * self.expert_parallel + expert_rank)
                for g in range(self.expert_data_parallel)]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} lies outside a world of {self.world_size}")
