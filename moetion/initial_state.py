"""The initial state is part of exactness: a stage's state as built, checked and fingerprinted.

Model libraries often allocate weights with ``torch.empty`` and initialise them only from a parent
model's init routine, which a layer built on its own never runs: its weights are then leftover
memory, different in every process and sometimes not even finite. A fault-free run and a recovered
one would start from different bits without anyone noticing. So a stage refuses non-finite
parameters as soon as it is built (:func:`check_finite`) and records a digest of its whole state
(:func:`digest`); whatever builds a stage's initial state again elsewhere (a replacement replaying
from before the first window, the single-process reference) checks its build against the recorded
digest (:func:`check_initial`), and the data-parallel replicas of a stage check that they agree
(:func:`check_replicas_agree`).
"""
from __future__ import annotations

import json
import logging
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from moetion.errors import ConfigError
from moetion.snapshot.image import checksum

log = logging.getLogger(__name__)

InitialDigest = dict[str, int]  # state-dict key -> 64-bit checksum of the tensor's bytes

LIKELY_CAUSE = ("the layer probably allocates it with torch.empty (or similar) and never initialises it, "
                "so it holds leftover memory; initialise it in the layer's __init__ (e.g. nn.init.normal_) "
                "so that every build gives the same bits")
_NAMED = 5  # offending tensors named in one message


def check_finite(module: nn.Module, *, where: str) -> None:
    """ConfigError naming the parameters of ``module`` that hold NaN or infinity."""
    bad = [name for name, p in module.named_parameters() if p.is_floating_point() and not p.is_meta and not _finite(p)]
    if bad:
        more = f" (and {len(bad) - _NAMED} more)" if len(bad) > _NAMED else ""
        raise ConfigError(f"{where}: parameter(s) {', '.join(bad[:_NAMED])}{more} hold non-finite values right "
                          f"after the stage was built: {LIKELY_CAUSE}")


def _finite(tensor: torch.Tensor) -> bool:
    """A sum is NaN or infinite if any element is; only then (or on overflow) check element-wise."""
    tensor = tensor.detach()
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def digest(module: nn.Module) -> InitialDigest:
    """A checksum of every tensor in ``module.state_dict()`` (meta tensors, which hold no data, skipped)."""
    return {name: checksum(t.detach().cpu().contiguous().view(-1).view(torch.uint8))
            for name, t in module.state_dict().items() if not t.is_meta}


def check_initial(module: nn.Module, built: Mapping[str, int], expected: Mapping[str, int], *, where: str,
                  against: str = "the initial state the job started from") -> None:
    """ConfigError naming the first tensor whose digest in ``built`` (this build of ``module``'s
    initial state) differs from ``expected`` (the digest recorded where the stage first started,
    described by ``against``)."""
    names = sorted(set(built) | set(expected))
    differing = [n for n in names if built.get(n) != expected.get(n)]
    if not differing:
        return
    first = differing[0]
    if first not in built or first not in expected:
        missing = "this build lacks" if first not in built else "the recorded initial state lacks"
        raise ConfigError(f"{where}: {missing} {first!r}: the model definition differs from the one the job "
                          f"started with")
    kind = "parameter" if first in dict(module.named_parameters()) else "buffer"
    more = f" ({len(differing) - 1} other tensor(s) differ too)" if len(differing) > 1 else ""
    raise ConfigError(f"{where}: {kind} {first} differs from {against}{more}, so this stage cannot be rebuilt "
                      f"bit for bit: {LIKELY_CAUSE}")


def check_replicas_agree(module: nn.Module, built: Mapping[str, int], *, group: dist.ProcessGroup,
                         device: torch.device, where: str) -> None:
    """ConfigError on every data-parallel replica of a stage when they were built to different bits
    (their gradients are averaged, so they would train apart unnoticed). One all-gather at start-up."""
    names = sorted(built)
    mine = torch.tensor([v - 2**64 if v >= 2**63 else v for v in (built[n] for n in names)], dtype=torch.int64,
                        device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    first = dict(zip(names, gathered[0].tolist()))
    for replica, theirs in enumerate(gathered[1:], start=1):
        check_initial(module, dict(zip(names, theirs.tolist())), first, where=f"{where}, replica {replica}",
                      against="replica 0's")


def encode(value: Mapping[str, int]) -> bytes:
    return json.dumps(dict(value), sort_keys=True).encode()


def decode(raw: bytes, *, source: str) -> InitialDigest | None:
    """A digest from JSON, or None (with a warning naming ``source``) when it is malformed."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if not (isinstance(value, dict) and all(isinstance(k, str) and type(v) is int for k, v in value.items())):
        log.warning("%s: the recorded initial-state digest is malformed; not checking the initial state", source)
        return None
    return value
