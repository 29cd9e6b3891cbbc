"""Each rank's final state, left for the harness, and the bitwise comparison of two runs.

When ``MOETION_HARNESS_OUT`` names a directory, the launcher registers :func:`record_final_state`
as a close hook of each rank (``moetion.engine.on_close``): closing the engine then writes the
rank's weights, buffers and frozen parameters, full optimizer state (with the LR scheduler's), every loss
it saw and the digest of its stage as built to ``rank-NNNNN.pt`` there (atomically),
so any training script that closes its engine can run under the harness unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moetion import env
from moetion.initial_state import LIKELY_CAUSE
from moetion.lr_scheduler import scheduler_state
from moetion.model_state import state_tensors

if TYPE_CHECKING:
    from moetion.engine import PipelineEngine


def record_final_state(engine: "PipelineEngine") -> None:
    out = env.harness_out()
    rank = engine.dist.rank
    state = {"rank": rank, "stage": engine.stage, "replica": engine.dist.replica, "iteration": engine.iteration,
             "model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "losses": dict(engine.losses),
             "lr_scheduler": scheduler_state(engine.lr_scheduler) if engine.lr_scheduler is not None else None,
             "buffers": sorted(state_tensors(engine.module)),  # which state-dict keys are not trained weights
             "initial_digest": engine.module.initial_digest}  # the stage as this process built it
    path = Path(out) / f"rank-{rank:05d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_final_states(directory: Path) -> dict[int, dict[str, Any]]:
    """On the CPU: the harness's process forks the next run's ranks and must not initialise CUDA."""
    return {int(p.stem.split("-")[1]): torch.load(p, weights_only=True, map_location="cpu") for p in sorted(Path(directory).glob("rank-*.pt"))}


@dataclass
class Verdict:
    """Bitwise comparison of a faulty run with its fault-free reference."""

    weights_equal: bool
    optimizer_equal: bool
    losses_equal: bool
    iterations: int
    mismatches: list[str] = field(default_factory=list)
    buffers_equal: bool = True  # persistent buffers and frozen parameters
    initial_equal: bool = True  # both runs started from the same bits

    @property
    def identical(self) -> bool:
        return (self.initial_equal and self.weights_equal and self.buffers_equal and self.optimizer_equal
                and self.losses_equal)

    def summary(self) -> str:
        verdict = "BIT-IDENTICAL" if self.identical else "MISMATCH"
        parts = ([] if self.initial_equal else ["INITIAL STATES DIFFER"]) + [
                 f"weights {'equal' if self.weights_equal else 'DIFFER'}",
                 f"buffers {'equal' if self.buffers_equal else 'DIFFER'}",
                 f"optimizer state {'equal' if self.optimizer_equal else 'DIFFERS'}",
                 f"{self.iterations} per-iteration losses {'equal' if self.losses_equal else 'DIFFER'}"]
        return f"{verdict} to the fault-free run: " + ", ".join(parts)


def compare_runs(reference: dict[int, dict[str, Any]], faulty: dict[int, dict[str, Any]]) -> Verdict:
    """Every rank's weights and optimizer state with ``torch.equal``; losses as exact floats, each
    iteration taken from every rank of the faulty run that saw it commit."""
    mismatches: list[str] = []
    if set(reference) != set(faulty):
        mismatches.append(f"ranks that finished: reference {sorted(reference)}, faulty {sorted(faulty)}")
    weights = buffers = optimizer = initial = True
    for rank in sorted(set(reference) & set(faulty)):
        ref, got = reference[rank], faulty[rank]
        differing = _initial_differences(ref, got)
        if differing:
            mismatches.append(f"rank {rank}: started from other bits than the reference ({differing[0]} differs"
                              f"{f' and {len(differing) - 1} more' if len(differing) > 1 else ''}): {LIKELY_CAUSE}")
            initial = False
        if ref["iteration"] != got["iteration"]:
            mismatches.append(f"rank {rank}: ended at iteration {got['iteration']}, reference {ref['iteration']}")
            weights = False
        state_keys = set(ref.get("buffers", ()))
        for name, tensor in ref["model"].items():
            if not torch.equal(tensor, got["model"].get(name, torch.empty(0))):
                if name in state_keys:
                    mismatches.append(f"rank {rank}: buffer {name} differs")
                    buffers = False
                else:
                    mismatches.append(f"rank {rank}: weight {name} differs")
                    weights = False
        for where in (_tensor_differences(ref["optimizer"], got["optimizer"], f"rank {rank}: optimizer")
                      + _tensor_differences(ref["lr_scheduler"], got["lr_scheduler"], f"rank {rank}: lr_scheduler")):
            mismatches.append(where)
            optimizer = False
    expected = _losses(reference)
    seen = {}
    losses = True
    for rank, state in faulty.items():
        for iteration, loss in state["losses"].items():
            if expected.get(iteration) != loss:
                mismatches.append(f"rank {rank}: loss of iteration {iteration} is {loss!r}, reference {expected.get(iteration)!r}")
                losses = False
            seen[iteration] = loss
    missing = sorted(set(expected) - set(seen))
    if missing:
        mismatches.append(f"no rank of the faulty run reported the loss of iterations {missing}")
        losses = False
    return Verdict(weights and not set(reference) ^ set(faulty), optimizer, losses, len(expected), mismatches,
                   buffers_equal=buffers, initial_equal=initial)


def _initial_differences(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """State-dict keys whose initial digest differs between the runs (none known: none)."""
    a, b = ref.get("initial_digest"), got.get("initial_digest")
    if a is None or b is None:
        return []
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def _losses(states: dict[int, dict[str, Any]]) -> dict[int, float]:
    merged: dict[int, float] = {}
    for state in states.values():
        merged.update(state["losses"])
    return merged


def _tensor_differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [f"{where} differs"]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{where}: keys differ"]
        return [d for k in a for d in _tensor_differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tensor_differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]
