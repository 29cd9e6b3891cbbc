"""Describing a model as a list of layers and building only this stage's share of it.

DeepSpeed's names (``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``) so it feels familiar, and
DeepSpeed's own spec objects are accepted as they are (:func:`adopt_layer`): a layer list written for
``deepspeed.pipe`` needs only a different import of ``PipelineModule``.
Each layer is built with its own seed derived from its index (or its tie key), so a layer's initial
weights do not depend on how the model is partitioned or which process builds it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from moetion import env
from moetion import expert_parallel as ep
from moetion import random as mrandom
from moetion.errors import ConfigError, PartitionError
from moetion.initial_state import check_finite, digest
from moetion.partition import balanced_partition, layer_weights
from moetion.topology import PipeTopology


ForwardFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class LayerSpec:
    """A layer described, not built: ``typename(*args, **kwargs)`` runs only on the owning stage."""

    def __init__(self, typename: type[nn.Module] | Callable[..., nn.Module], *args: Any, **kwargs: Any) -> None:
        if not callable(typename):
            raise TypeError(f"LayerSpec needs a module class or factory, got {typename!r}")
        self.typename = typename
        self.args = args
        self.kwargs = kwargs

    @property
    def name(self) -> str:
        return getattr(self.typename, "__name__", type(self.typename).__name__)

    def build(self) -> nn.Module:
        module = self.typename(*self.args, **self.kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(f"LayerSpec({self.name}) built {type(module).__name__}, not an nn.Module")
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class TiedLayerSpec(LayerSpec):
    """A layer whose parameters are shared by every occurrence of the same ``key``.

    Typical use: the token embedding at the first stage and the LM head at the last. Each stage
    holding the key builds its own copy from the same seed; their gradients are summed after the
    backward passes, so the copies stay bit-identical. ``forward_fn(module, x)`` lets an
    occurrence use the module differently (the head multiplies by the embedding's weight).
    """

    def __init__(
        self,
        key: str,
        typename: type[nn.Module] | Callable[..., nn.Module],
        *args: Any,
        forward_fn: ForwardFn | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(typename, *args, **kwargs)
        self.key = key
        self.forward_fn = forward_fn

    def __repr__(self) -> str:
        return f"TiedLayerSpec({self.key!r}, {self.name})"


class _DeepSpeedTiedSpec(TiedLayerSpec):
    """A DeepSpeed ``TiedLayerSpec``: DeepSpeed ties only ``tied_weight_attr``, moetion every parameter
    of the module, so a module with parameters outside ``tied_weight_attr`` is refused when built."""

    def __init__(self, key: str, typename: Callable[..., nn.Module], args: tuple, kwargs: dict, *,
                 forward_fn: ForwardFn | None, tied: tuple[str, ...]) -> None:
        super().__init__(key, typename, *args, forward_fn=forward_fn, **kwargs)
        self.tied_weight_attr = tied

    def build(self) -> nn.Module:
        module = super().build()
        untied = sorted(set(n for n, _ in module.named_parameters()) - set(self.tied_weight_attr))
        if untied:
            raise ConfigError(
                f"TiedLayerSpec({self.key!r}, {self.name}) ties {list(self.tied_weight_attr)} but the module also has "
                f"parameters {untied}: moetion ties every parameter of a tied module (DeepSpeed ties only "
                "tied_weight_attr); move the untied ones into a layer of their own")
        return module


class _FunctionLayer(nn.Module):
    """A parameter-free function in a layer list (DeepSpeed allows ``lambda x: ...`` entries)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def adopt_layer(layer: Any) -> LayerSpec | nn.Module:
    """``layer`` as moetion describes it: its own specs and modules as they are, DeepSpeed's
    ``LayerSpec``/``TiedLayerSpec`` (recognised by their attributes ``typename``, ``module_args``,
    ``module_kwargs``, and ``key``, ``tied_weight_attr``, ``forward_fn`` for a tied one) converted,
    and a plain function wrapped in a parameter-free module."""
    if isinstance(layer, (LayerSpec, nn.Module)):
        return layer
    if all(hasattr(layer, a) for a in ("typename", "module_args", "module_kwargs")):
        args, kwargs = tuple(layer.module_args), dict(layer.module_kwargs)
        if all(hasattr(layer, a) for a in ("key", "tied_weight_attr")):
            tied = layer.tied_weight_attr
            tied = (tied,) if isinstance(tied, str) else tuple(tied)
            return _DeepSpeedTiedSpec(layer.key, layer.typename, args, kwargs,
                                      forward_fn=getattr(layer, "forward_fn", None), tied=tied)
        return LayerSpec(layer.typename, *args, **kwargs)
    if callable(layer):
        return _FunctionLayer(layer)
    raise TypeError(f"a layer is {type(layer).__name__}; expected LayerSpec, TiedLayerSpec (moetion's or DeepSpeed's), "
                    "an nn.Module or a function")


class StagePosition:
    """Where a stage sits in its pipeline: ``stage_id`` of ``num_stages`` (set by the subclass)."""

    stage_id: int
    num_stages: int

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1


class PipelineModule(StagePosition, nn.Module):
    """This stage's slice of a layer list, plus the partition of the whole list.

    Args:
        layers: ``LayerSpec``/``TiedLayerSpec`` entries (moetion's or DeepSpeed's), already-built
            modules, or parameter-free functions, in model order.
        num_stages: pipeline stages to split the layers into.
        loss_fn: ``loss_fn(outputs, labels)`` evaluated on the last stage.
        partition_method: ``"parameters"`` (balance parameter counts), ``"uniform"`` (balance
            layer counts) or ``"type:<regex>"`` (balance layers whose class name matches).
        stage_id: the stage to build; by default derived from ``RANK`` and ``WORLD_SIZE``.
        seed: root of the per-layer initialisation seeds.
        ep_size: expert parallelism (DeepSpeed's name): the data-parallel replicas of each stage
            form groups of ``ep_size`` ranks that split every :class:`~moetion.moe.MoELayer`'s
            experts in blocks; it must divide the replicas and every layer's expert count.
        expert_rank: this rank's place in its expert-parallel group; by default derived from
            ``RANK`` and ``WORLD_SIZE``.

    A built stage whose parameters hold NaN or infinity is refused (``ConfigError`` naming them:
    typically weights allocated with ``torch.empty`` and never initialised); ``initial_digest``
    records a checksum of every tensor of the stage as built (before an expert-parallel rank drops
    the experts it does not hold, so that every replica and the unsharded reference agree).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec | nn.Module | Any],
        num_stages: int,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        partition_method: str = "parameters",
        stage_id: int | None = None,
        seed: int = 0,
        ep_size: int = 1,
        expert_rank: int | None = None,
    ) -> None:
        super().__init__()
        if not layers:
            raise PartitionError("PipelineModule needs at least one layer")
        self.specs = [adopt_layer(layer) for layer in layers]
        self.num_stages = num_stages
        self.loss_fn = loss_fn
        self.partition_method = partition_method
        self.seed = seed
        self.stage_id = _stage_from_env(num_stages) if stage_id is None else stage_id
        if not 0 <= self.stage_id < num_stages:
            raise ConfigError(f"stage_id {self.stage_id} outside a pipeline of {num_stages} stages")
        weights = layer_weights(partition_method, names=[_name(s) for s in self.specs], param_count=self._count_params)
        self.parts = balanced_partition(weights, num_stages)
        self.layers = nn.ModuleDict()
        self.tied = nn.ModuleDict()
        # (global index, module, forward_fn or None). Plain data, no closures, so that a deepcopy
        # of this module (the bf16 compute copy) calls its own copies of the layers.
        self._steps: list[tuple[int, nn.Module, ForwardFn | None]] = [
            (index, *self._build_layer(index))
            for index in range(self.parts[self.stage_id], self.parts[self.stage_id + 1])
        ]
        check_finite(self, where=f"stage {self.stage_id}")
        # The stage's state as built: a rebuild elsewhere (a replacement, the reference) must equal it.
        self.initial_digest = digest(self)
        self.ep_size = ep_size
        # Names of the unsharded stage's parameters: the order the global grad norm adds them in.
        self.unsharded_names = [name for name, _ in self.named_parameters()]
        self.expert_shard = ep.ExpertShard()
        if ep_size != 1:
            ep.check_model([self._meta_layer(i) for i in range(len(self.specs))], ep_size=ep_size)
            rank = _expert_rank_from_env(num_stages, ep_size) if expert_rank is None else expert_rank
            if not 0 <= rank < ep_size:
                raise ConfigError(f"expert_rank {rank} outside an expert-parallel group of {ep_size}")
            self.expert_shard = ep.ExpertShard(ep_size, rank)
            ep.shard_module(self, self.expert_shard)

    # -- partition facts every rank can compute -------------------------------------------------
    def stage_layers(self, stage: int) -> range:
        """Global indices of the layers owned by ``stage``."""
        return range(self.parts[stage], self.parts[stage + 1])

    def tied_stages(self) -> dict[str, list[int]]:
        """For each tie key, the stages holding a copy (sorted); only keys on >= 2 stages."""
        stages: dict[str, set[int]] = {}
        for stage in range(self.num_stages):
            for index in self.stage_layers(stage):
                spec = self.specs[index]
                if isinstance(spec, TiedLayerSpec):
                    stages.setdefault(spec.key, set()).add(stage)
        return {key: sorted(s) for key, s in sorted(stages.items()) if len(s) > 1}

    def tied_parameter_owner(self, key: str) -> int:
        """The stage that counts a tied weight once in the global gradient norm."""
        return min(s for s in range(self.num_stages) for i in self.stage_layers(s)
                   if isinstance(self.specs[i], TiedLayerSpec) and self.specs[i].key == key)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs this stage's layers; under a step context each layer draws from its own generator."""
        context = mrandom._current.get()
        for index, module, forward_fn in self._steps:
            if context is None:
                x = _run(module, forward_fn, x)
            else:
                with mrandom.step_context(context.for_layer(index)):
                    x = _run(module, forward_fn, x)
        return x

    # -- construction ----------------------------------------------------------------------------
    def _build_layer(self, index: int) -> tuple[nn.Module, ForwardFn | None]:
        spec = self.specs[index]
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in self.tied:
                self.tied[spec.key] = _seeded_build(spec, mrandom.derive_seed(mrandom.DOMAIN_INIT, self.seed, spec.key))
            return self.tied[spec.key], spec.forward_fn
        if isinstance(spec, LayerSpec):
            module = _seeded_build(spec, mrandom.derive_seed(mrandom.DOMAIN_INIT, self.seed, index))
        else:
            module = spec
        self.layers[str(index)] = module
        return module, None

    def _count_params(self, index: int) -> int:
        return sum(p.numel() for p in self._meta_layer(index).parameters())

    def _meta_layer(self, index: int) -> nn.Module:
        """Layer ``index`` built on the meta device (no memory, no init), to look at its structure."""
        spec = self.specs[index]
        if isinstance(spec, nn.Module):
            return spec
        with torch.device("meta"):
            return spec.build()


def _run(module: nn.Module, forward_fn: ForwardFn | None, x: torch.Tensor) -> torch.Tensor:
    return module(x) if forward_fn is None else forward_fn(module, x)


def _seeded_build(spec: LayerSpec, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build()


def _name(spec: LayerSpec | nn.Module) -> str:
    return spec.name if isinstance(spec, LayerSpec) else type(spec).__name__


def _stage_from_env(num_stages: int) -> int:
    rank, world = env.rank_or_none(), env.world_size_or_none()
    if rank is None or world is None:
        raise ConfigError(
            "PipelineModule needs stage_id=... or the RANK and WORLD_SIZE environment variables "
            "(run under `moetion launch` or `torchrun`)"
        )
    return PipeTopology.from_world(world_size=world, num_stages=num_stages).stage_of(rank)


def _expert_rank_from_env(num_stages: int, ep_size: int) -> int:
    rank, world = env.rank_or_none(), env.world_size_or_none()
    if rank is None or world is None:
        raise ConfigError(
            "PipelineModule(ep_size>1) needs expert_rank=... or the RANK and WORLD_SIZE environment variables"
        )
    return PipeTopology.from_world(world_size=world, num_stages=num_stages, expert_parallel=ep_size).expert_rank_of(rank)
