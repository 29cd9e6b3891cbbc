"""Routing statistics: how many tokens each expert received, which orders the sparse snapshots.

A MoE layer reports its per-expert token counts from its forward with :func:`report_token_counts`
(the built-in :class:`~moetion.moe.MoELayer` does); the iteration body collects them from every
layer with mapped experts (:class:`TokenCounts`), the data-parallel replicas add them up, and the
checkpointer snapshots the least popular experts first. A layer that reports nothing, or reports
counts that do not match its experts, is ordered by expert name ("unknown popularity"), with a note
once naming it: never an error, as the order affects cost, not exactness.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn

from moetion.errors import ConfigError
from moetion.experts import ExpertLayout, layout_of, num_stacked_experts

log = logging.getLogger(__name__)

_REPORTED = "_moetion_token_counts"  # a plain attribute of the layer: in no state_dict


def report_token_counts(layer: nn.Module, counts: torch.Tensor) -> None:
    """Adds ``counts`` (tokens routed to each expert of ``layer``, shape ``[E]``, before any capacity
    dropping) to what the layer reported in this iteration. Call it from the layer's ``forward``,
    e.g. ``moetion.report_token_counts(self, torch.bincount(choices.flatten(), minlength=E))``."""
    counts = counts.detach().to("cpu", torch.int64)
    held = layer.__dict__.get(_REPORTED)
    if counts.dim() != 1 or (held is not None and held.shape != counts.shape):
        was = "" if held is None else f" (earlier calls reported {held.numel()})"
        raise ConfigError(f"report_token_counts({type(layer).__name__}): expected one count per expert, a 1-D "
                          f"tensor, got shape {tuple(counts.shape)}{was}")
    object.__setattr__(layer, _REPORTED, counts.clone() if held is None else held + counts)


class TokenCounts:
    """Collects, once per iteration, the counts reported by the stage's layers with mapped experts."""

    def __init__(self, module: nn.Module) -> None:
        self.layers = [(name, layer, _expert_count(layer, layout)) for name, layer in module.named_modules()
                       if (layout := layout_of(layer)) is not None]
        self._noted: set[str] = set()

    def pop(self, *, note: bool = True) -> dict[str, torch.Tensor]:
        """Each layer's counts since the last call, by layer name; layers without usable counts are
        left out (and, with ``note``, named once)."""
        found = {}
        for name, layer, experts in self.layers:
            counts = layer.__dict__.pop(_REPORTED, None)
            if counts is not None and counts.numel() == experts:
                found[name] = counts
            elif note and name not in self._noted:
                self._noted.add(name)
                why = ("reports no per-expert token counts" if counts is None
                       else f"reported {counts.numel()} token counts for {experts} experts")
                log.info("%s (%s) %s: its experts are snapshotted in name order (unknown popularity); report them "
                         "with moetion.report_token_counts(self, counts) in its forward", name or "the stage module",
                         type(layer).__name__, why)
        return found


def expert_counts(experts: Sequence[tuple[str, int]], token_counts: Mapping[str, torch.Tensor]) -> list[float]:
    """Tokens of each (layer, expert index), in order; 0 for the experts of a layer of unknown popularity."""
    counts = []
    for name, expert in experts:
        layer = token_counts.get(name)
        counts.append(0.0 if layer is None else float(layer[expert]))
    return counts


def _expert_count(layer: nn.Module, layout: ExpertLayout) -> int:
    """Experts the layer routes to: all of them, also those an expert-parallel rank does not hold."""
    total = getattr(layer, "num_experts", None)
    if type(total) is int and layout.first_expert + len(layout.modules) <= total:
        return total
    return len(layout.modules) if layout.modules else num_stacked_experts(layer, layout)
