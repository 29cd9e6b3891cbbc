"""A stage's state besides its trainable parameters: persistent buffers and frozen parameters.

Normalisation statistics, an expert-bias buffer updated before each optimizer step, token counters
and parameters that do not train all change (or may change) while training, and a recovered stage
must hold them bit for bit. They are few and small next to the weights, so they are handled
densely: cloned at every commit (only the tensors whose version counter moved since the last
clone), put back into the stage when a survivor abandons an interrupted iteration, and captured
whole with the first capture of every window so a replay starts from them.

A non-persistent buffer is not part of ``state_dict()``, so no checkpoint of any kind holds it;
one that changes over the first iterations is named in a warning, once.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

NON_PERSISTENT_CHECKS = 4  # commits over which non-persistent buffers are watched for changes


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent buffer and every parameter that does not require grad, by state-dict key."""
    params = {name: p for name, p in module.named_parameters() if not p.requires_grad}
    buffers = {name: b for name, b in module.named_buffers() if _is_persistent(module, name)}
    return {**buffers, **params}


def _is_persistent(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return leaf not in sub._non_persistent_buffers_set  # torch keeps no public accessor for it


class CommittedState:
    """The state tensors as of the last commit, so an abandoned iteration's changes can be undone.

    :meth:`commit` clones every state tensor. Version counters cannot tell which changed: kernels
    such as batch norm update their running statistics in place without moving them. The state is
    small next to the weights (``experiments/bench_layouts.py`` measures the clone per iteration).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._saved: dict[str, torch.Tensor] = {}
        self._transient: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()
        self._watch_left = NON_PERSISTENT_CHECKS

    def commit(self) -> None:
        """Call at the commit point (after the optimizer step, before the next forward)."""
        self._saved = {name: t.detach().clone() for name, t in state_tensors(self.module).items()}
        if self._watch_left:
            self._watch_non_persistent()

    def rollback(self) -> None:
        """Puts the committed values back (an abandoned iteration's forwards may have changed them)."""
        load_state_tensors(self.module, self._saved)

    def _watch_non_persistent(self) -> None:
        """Over the first commits, names once each non-persistent buffer that changed between them."""
        self._watch_left -= 1
        for name, buffer in self.module.named_buffers():
            if _is_persistent(self.module, name) or name in self._warned:
                continue
            before = self._transient.get(name)
            if before is not None and not (before.shape == buffer.shape and torch.equal(before, buffer)):
                log.warning("non-persistent buffer %r changed while training: it is not in state_dict(), so no "
                            "snapshot, restore or export holds it; register it with persistent=True if "
                            "training depends on it", name)
                self._warned.add(name)
            self._transient[name] = buffer.detach().clone()
        if not self._watch_left:
            self._transient = {}


def load_state_tensors(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copies ``values`` (by state-dict key) into the module's state tensors."""
    live = state_tensors(module)
    with torch.no_grad():
        for name, value in values.items():
            live[name].copy_(value)
