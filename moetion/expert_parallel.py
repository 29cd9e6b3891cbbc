"""Expert parallelism: which rank owns which experts, the all-to-all that carries tokens to them.

Experts are placed in **blocks** over an expert-parallel group of ``E`` ranks, as in DeepSpeed-MoE
and Megatron: expert rank ``j`` owns experts ``j*L .. j*L+L-1`` of every MoE layer (``L`` =
experts / ``E``). Blocks keep a rank's experts contiguous in the dispatch buffer (which is laid out
expert-major), so one equal-split ``all_to_all_single`` sends each rank exactly its experts' slots.

Only the built-in :class:`~moetion.moe.MoELayer` is sharded: its capacity-padded dispatch buffer
makes every split size static, and its per-source gradient accumulation reproduces the reduction
structure of data parallelism, so an expert-parallel run is bit-identical to the same model trained
with ``ep_size=1`` (see docs/experts.md).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moetion import failure_notice
from moetion.errors import ConfigError, PeerFailure


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place in its expert-parallel group, and so its block of each layer's experts."""

    size: int = 1
    rank: int = 0

    def owner(self, expert: int, num_experts: int) -> int:
        """The expert rank holding global expert ``expert``."""
        return expert // (num_experts // self.size)

    def local_experts(self, num_experts: int) -> range:
        """Global indices of the experts this rank owns."""
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


def check_model(layers: Sequence[nn.Module], *, ep_size: int) -> None:
    """Refuses an expert-parallel size the model cannot be split by, before any process group exists.

    ``layers`` are the model's layers (built on the meta device is enough).
    """
    if ep_size < 1:
        raise ConfigError(f"ep_size must be >= 1, got {ep_size}")
    if ep_size == 1:
        return
    from moetion.experts import layout_of, looks_like_moe
    from moetion.moe import MoELayer

    moe: list[str] = []
    for index, layer in enumerate(layers):
        inside: list[str] = []  # names of this layer's MoELayers: their router and experts are theirs
        for name, sub in layer.named_modules():
            if any(p == "" or name == p or name.startswith(f"{p}.") for p in inside):
                continue
            where = f"layer {index}" + (f" ({name})" if name else "")
            if isinstance(sub, MoELayer):
                inside.append(name)
                moe.append(where)
                if sub.num_experts % ep_size:
                    raise ConfigError(f"ep_size={ep_size} does not divide the {sub.num_experts} experts of {where}: "
                                      "each expert-parallel rank must own the same number of experts")
            elif layout_of(sub) is not None or looks_like_moe(sub):
                raise ConfigError(f"ep_size={ep_size}: {where} is a MoE layer of class {type(sub).__name__}; expert "
                                  "parallelism shards only moetion.moe.MoELayer (it owns the all-to-all dispatch)")
    if not moe:
        raise ConfigError(f"ep_size={ep_size} but the model has no moetion.moe.MoELayer: there are no experts to "
                          "spread over ranks (use ep_size=1)")


_group: contextvars.ContextVar[dist.ProcessGroup | None] = contextvars.ContextVar("moetion_expert_group", default=None)


@contextlib.contextmanager
def expert_group(group: dist.ProcessGroup | None) -> Iterator[None]:
    """The expert-parallel group the MoE layers of forwards run inside this block exchange tokens over."""
    token = _group.set(group)
    try:
        yield
    finally:
        _group.reset(token)


def current_group() -> dist.ProcessGroup | None:
    return _group.get()


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Equal-split all-to-all along dim 0; its backward is the same exchange of the gradients.

    The backward exchange is a collective too, so every rank of the group must run it, also one
    whose ``x`` needs no gradient (its experts got no token, or are frozen in a replay): a fresh
    leaf that always requires a gradient rides along, so autograd never skips the node.
    """
    anchor = torch.zeros((), device=x.device, requires_grad=True)
    return _AllToAll.apply(x, anchor, group)


def exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk ``j`` of ``x`` goes to group rank ``j``; chunk ``j`` of the result came from rank ``j``."""
    out = torch.empty_like(x)
    try:
        dist.all_to_all_single(out, x.contiguous(), group=group)
    except RuntimeError as error:
        raise PeerFailure(failure_notice.explain(
            f"lost an expert-parallel peer in the all-to-all: {str(error).splitlines()[0]}")) from None
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return exchange(grad, ctx.group), torch.zeros((), device=grad.device), None


def shard_module(module: nn.Module, shard: ExpertShard) -> None:
    """Drops, from every MoE layer of ``module``, the experts another expert rank owns."""
    from moetion.moe import MoELayer

    for layer in module.modules():
        if isinstance(layer, MoELayer):
            layer.shard_experts(shard)


def stage_norm_order(global_names: Sequence[str], local_names: Sequence[str], shard: ExpertShard,
                     num_experts: dict[str, int]) -> list[tuple[int, int]]:
    """For each name of the unsharded stage's norm parameters, in order: (expert rank, index in
    that rank's list of local norm parameters).

    Every expert rank holds the same non-expert parameters and its own block of experts, so each
    rank's list is the global one minus the other ranks' experts; a non-expert parameter is taken
    from this rank (all ranks hold the same averaged gradient).
    """
    lists: list[list[str]] = [[] for _ in range(shard.size)]
    for name in global_names:
        owner = _expert_owner(name, shard, num_experts)
        for rank in range(shard.size):
            if owner is None or owner == rank:
                lists[rank].append(name)
    if lists[shard.rank] != list(local_names):
        raise ConfigError("the parameters of this expert-parallel rank do not match its share of the stage's "
                          "parameters (were experts frozen or added after the module was built?)")
    positions = [{name: i for i, name in enumerate(names)} for names in lists]
    order = []
    for name in global_names:
        owner = _expert_owner(name, shard, num_experts)
        rank = shard.rank if owner is None else owner
        order.append((rank, positions[rank][name]))
    return order


class ShardedNorm:
    """A stage's squared grad norm when its experts are spread over an expert-parallel group.

    Each rank's per-parameter norms are all-gathered over the group and added in the unsharded
    stage's parameter order, so every rank (and the unsharded reference) adds the same numbers in
    the same order and gets the same bits.
    """

    def __init__(self, order: list[tuple[int, int]], group: dist.ProcessGroup) -> None:
        self.order, self.group = order, group

    def squared(self, params: Sequence[nn.Parameter], *, device: torch.device) -> torch.Tensor:
        from moetion import gradients

        mine = torch.stack(gradients.param_norms(params)).to(device)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        try:
            dist.all_gather(gathered, mine, group=self.group)
        except RuntimeError as error:
            raise PeerFailure(failure_notice.explain(
                f"lost an expert-parallel peer while exchanging grad norms: {str(error).splitlines()[0]}")) from None
        return gradients.sum_of_squares([gathered[rank][i] for rank, i in self.order], device=device)


def sharded_norm(module: nn.Module, norm_params: Sequence[nn.Parameter], group: dist.ProcessGroup | None,
                 ) -> ShardedNorm | None:
    """The :class:`ShardedNorm` of a module built with ``ep_size > 1`` (None otherwise)."""
    shard = getattr(module, "expert_shard", ExpertShard())
    if shard.size == 1:
        return None
    from moetion.moe import MoELayer

    names = {id(p): n for n, p in module.named_parameters()}
    local = [names[id(p)] for p in norm_params]
    counts = {n: m.num_experts for n, m in module.named_modules() if isinstance(m, MoELayer)}
    kept = set(local)
    global_names = [n for n in module.unsharded_names
                    if n in kept or _expert_owner(n, shard, counts) not in (None, shard.rank)]
    return ShardedNorm(stage_norm_order(global_names, local, shard, counts), group)


def _expert_owner(name: str, shard: ExpertShard, num_experts: dict[str, int]) -> int | None:
    layer, sep, rest = name.rpartition(".experts.")
    if not sep or layer not in num_experts:
        return None
    return shard.owner(int(rest.split(".", 1)[0]), num_experts[layer])
