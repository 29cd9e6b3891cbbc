"""Rank <-> (stage, replica) coordinates for pipeline x data parallelism.

Ranks are laid out stage-major, replica-minor (``rank = stage * data_parallel + replica``), as in
DeepSpeed: the replicas of one stage sit on neighbouring ranks, so the heavy data-parallel
gradient all-reduce stays within a host when hosts hold consecutive ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

from moetion.errors import ConfigError


@dataclass(frozen=True)
class PipeTopology:
    num_stages: int
    data_parallel: int = 1

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.data_parallel < 1:
            raise ConfigError(
                f"num_stages and data_parallel must be >= 1, got {self.num_stages} and {self.data_parallel}"
            )

    @classmethod
    def from_world(cls, *, world_size: int, num_stages: int) -> "PipeTopology":
        """The topology implied by a world size; it must be stages x replicas exactly."""
        if num_stages < 1:
            raise ConfigError(f"num_stages must be >= 1, got {num_stages}")
        if world_size % num_stages != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by num_stages={num_stages}: "
                "launch (pipeline stages x data-parallel replicas) processes"
            )
        return cls(num_stages=num_stages, data_parallel=world_size // num_stages)

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

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} lies outside a world of {self.world_size}")
