"""Where a MoE layer keeps its experts: the declaration hook, the protocol, and detection.

Sparse snapshots work per expert, so moetion must know each expert's parameters. It finds them in
three ways, first match wins:

1. **Declared**: ``moetion.experts(layer, modules=[...] | stacked=[...], router=[...])``.
2. **Protocol**: the layer has a method ``moetion_experts()`` returning an :class:`ExpertLayout`.
3. **Detected**: a ``ModuleList``/``ModuleDict`` child named ``experts`` (any expert class), or,
   on a layer with an integer ``num_experts`` attribute ``E``, its own parameters whose leading
   dimension is ``E`` (a stacked, grouped-GEMM layout: one operator is the slice ``[e]`` of each).

A layer that looks like MoE (a router or gate, a ``num_experts``/``top_k`` attribute) but maps to no
experts is snapshotted densely, and :func:`warn_unmapped` says so once, naming it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from moetion.errors import ConfigError

log = logging.getLogger(__name__)

_DECLARED = "_moetion_expert_layout"
_ROUTER_NAMES = ("router", "gate")
_MOE_HINTS = ("num_experts", "n_experts", "top_k", "num_experts_per_tok")


@dataclass(frozen=True)
class ExpertLayout:
    """One MoE layer's experts, by names relative to the layer.

    ``modules``: one child module per expert, in expert order (a ``ModuleList``'s ``experts.0``,
    ``experts.1``, ... or a ``ModuleDict``'s keys). ``stacked``: parameters whose dimension 0 is the
    expert (``w1: [E, hidden, ffn]``); expert ``e`` is the slice ``[e]`` of each. ``router``: child
    modules or parameters of the router, one operator of their own. Exactly one of ``modules`` and
    ``stacked`` is non-empty.
    """

    modules: tuple[str, ...] = ()
    stacked: tuple[str, ...] = ()
    router: tuple[str, ...] = ()
    first_expert: int = 0  # global index of ``modules[0]`` (a block of experts under expert parallelism)


def experts(
    layer: nn.Module,
    *,
    modules: Sequence[str] = (),
    stacked: Sequence[str] = (),
    router: Sequence[str] = (),
    expert_dim: int = 0,
) -> nn.Module:
    """Declares where ``layer`` keeps its experts (names relative to ``layer``); returns ``layer``.

    Call where the layer is built (in its ``__init__`` or the ``LayerSpec`` factory), before
    :func:`moetion.initialize`. Stacked parameters must hold the expert in dimension ``expert_dim``,
    which must be 0 (transpose the layout, or declare per-expert modules, otherwise).
    """
    if bool(modules) == bool(stacked):
        raise ConfigError(f"moetion.experts({type(layer).__name__}): give exactly one of modules=[...] "
                          f"(one child per expert) or stacked=[...] (parameters with a leading expert dimension)")
    if expert_dim != 0:
        raise ConfigError(f"moetion.experts({type(layer).__name__}): expert_dim={expert_dim}, but stacked experts "
                          "must lead with the expert dimension (expert_dim=0); store them as [E, ...]")
    layout = ExpertLayout(tuple(modules), tuple(stacked), tuple(router))
    _check(layer, layout, where=f"moetion.experts({type(layer).__name__})")
    object.__setattr__(layer, _DECLARED, layout)  # a plain attribute: it survives deepcopy, not state_dict
    return layer


def layout_of(layer: nn.Module) -> ExpertLayout | None:
    """The layer's experts: declared, reported by its ``moetion_experts()``, or detected; else None."""
    declared = getattr(layer, _DECLARED, None)
    if declared is not None:
        return declared
    protocol = getattr(layer, "moetion_experts", None)
    if callable(protocol):
        layout = protocol()
        if not isinstance(layout, ExpertLayout):
            raise ConfigError(f"{type(layer).__name__}.moetion_experts() returned {type(layout).__name__}, "
                              "expected a moetion.ExpertLayout")
        _check(layer, layout, where=f"{type(layer).__name__}.moetion_experts()")
        return layout
    return _detect(layer)


def num_stacked_experts(layer: nn.Module, layout: ExpertLayout) -> int:
    """E of a stacked layout: the common leading dimension of its parameters."""
    return layer.get_parameter(layout.stacked[0]).shape[0]


def looks_like_moe(layer: nn.Module) -> bool:
    """A router or gate child or parameter, or a ``num_experts``-like attribute."""
    children = dict(layer.named_children())
    direct = dict(layer.named_parameters(recurse=False))
    return (any(n in children or n in direct for n in _ROUTER_NAMES)
            or any(isinstance(getattr(layer, h, None), int) for h in _MOE_HINTS))


_warned: set[tuple[str, str]] = set()


def warn_unmapped(name: str, layer: nn.Module) -> None:
    """Once per layer and process: the layer looks like MoE but is snapshotted densely."""
    key = (name, type(layer).__name__)
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "%s (%s) looks like a MoE layer but moetion found no experts in it: it is snapshotted densely, "
        "at its full size in every window; declare them with moetion.experts(layer, modules=[...]) for "
        "per-expert modules or moetion.experts(layer, stacked=[...]) for [E, ...] tensors, plus router=[...]",
        name or "the stage module", type(layer).__name__)


def _detect(layer: nn.Module) -> ExpertLayout | None:
    router = tuple(n for n in _ROUTER_NAMES if n in dict(layer.named_children()) or n in dict(layer.named_parameters(recurse=False)))
    container = getattr(layer, "experts", None)
    if isinstance(container, (nn.ModuleList, nn.ModuleDict)) and len(container) >= 2:
        return ExpertLayout(modules=tuple(f"experts.{key}" for key, _ in container.named_children()), router=router)
    count = getattr(layer, "num_experts", None)
    if isinstance(count, int) and count >= 2:
        stacked = tuple(n for n, p in layer.named_parameters(recurse=False)
                        if p.dim() >= 1 and p.shape[0] == count and n not in router)
        if stacked:
            return ExpertLayout(stacked=stacked, router=router)
    return None


def _check(layer: nn.Module, layout: ExpertLayout, *, where: str) -> None:
    params = dict(layer.named_parameters())
    children = dict(layer.named_modules())
    for name in layout.modules + layout.router:
        if name not in children and name not in params:
            raise ConfigError(f"{where}: {type(layer).__name__} has no submodule or parameter {name!r}")
    leading = {params[n].shape[0] if n in params and params[n].dim() else None for n in layout.stacked}
    missing = [n for n in layout.stacked if n not in params]
    if missing:
        raise ConfigError(f"{where}: {type(layer).__name__} has no parameter(s) {missing} to stack experts in")
    if len(leading) > 1 or None in leading:
        raise ConfigError(f"{where}: stacked parameters {list(layout.stacked)} must share one leading expert "
                          f"dimension; found leading sizes {sorted(str(x) for x in leading)}")
