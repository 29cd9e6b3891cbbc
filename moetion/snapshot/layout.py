"""Where each tensor of a window goes: the entries of every capture and their source tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from moetion.operators import Operator, stacked_parameters
from moetion.snapshot.image import Entry, aligned, dtype_name
from moetion.window import SlotPlan

STATE_OPERATOR = "stage-state"  # the entries of a stage's buffers and frozen parameters (role "state")


@dataclass
class WindowLayout:
    """Per capture, the blob entries (checksums still 0) and the live tensors they copy."""

    entries: list[list[Entry]]
    sources: list[list[torch.Tensor]]
    blob_bytes: int

    def largest_capture_bytes(self) -> int:
        """Bytes of the largest capture: what one staging buffer must hold."""
        return max((sum(e.nbytes for e in capture) for capture in self.entries), default=0)


def plan_layout(
    *,
    plan: SlotPlan,
    operators: dict[str, Operator],
    master: nn.Module,
    compute: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, torch.Tensor],
) -> WindowLayout:
    """Lays out capture ``i``: full snapshots of slot ``i``, compute snapshots of later slots; capture
    0 also holds ``state`` (the stage's buffers and frozen parameters, cloned at that commit: forward
    changes them while the capture thread copies), from which a replay of the window starts, and the
    optimizer state that all slices of a stacked parameter share (Adam's ``step``).

    Call after the window's first optimizer step, when the optimizer state exists.
    """
    masters = dict(master.named_parameters())
    computes = dict(compute.named_parameters())
    entries: list[list[Entry]] = []
    sources: list[list[torch.Tensor]] = []
    offset = 0

    def add(capture: list, capture_sources: list, op: str, param: str, role: str, tensor: torch.Tensor) -> None:
        nonlocal offset
        nbytes = tensor.numel() * tensor.element_size()
        capture.append(Entry(op, param, role, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes))
        capture_sources.append(tensor)
        offset = aligned(offset + nbytes)

    for i, slot in enumerate(plan.slots):
        capture, capture_sources = [], []
        if i == 0:
            for name, tensor in state.items():
                add(capture, capture_sources, STATE_OPERATOR, name, "state", tensor)
            for name in stacked_parameters(list(operators.values())):
                for key, value in _optimizer_state(optimizer, masters[name]):
                    if value.shape != masters[name].shape:  # shared by every slice: Adam's step
                        add(capture, capture_sources, STATE_OPERATOR, name, f"optim.{key}", value)
        for op in slot:
            operator = operators[op]
            for name in operator.param_names:
                add(capture, capture_sources, op, name, "weight", expert_view(operator, masters[name]))
                for key, value in _optimizer_state(optimizer, masters[name]):
                    if not operator.sliced or value.shape == masters[name].shape:
                        add(capture, capture_sources, op, name, f"optim.{key}", expert_view(operator, value))
        for later in plan.slots[i + 1 :]:
            for op in later:
                for name in operators[op].param_names:
                    add(capture, capture_sources, op, name, "compute", expert_view(operators[op], computes[name]))
        entries.append(capture)
        sources.append(capture_sources)
    return WindowLayout(entries, sources, offset)


def expert_view(operator: Operator | None, tensor: torch.Tensor) -> torch.Tensor:
    """The part of a parameter (or of its per-element optimizer state) that ``operator`` owns: the
    slice ``[expert]`` of a stacked tensor (a view: nothing else is copied), else all of it."""
    return tensor[operator.expert] if operator is not None and operator.sliced else tensor


def _optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    state = optimizer.state.get(param, {})
    return [(key, state[key]) for key in sorted(k for k, v in state.items() if torch.is_tensor(v))]
