"""Operators: the units of sparse snapshotting on a stage.

One operator per expert of every MoE layer, one per router, and one per layer for the layer's
remaining (dense) parameters; a tied module is one dense operator. Every trainable parameter
belongs to exactly one operator, which :func:`discover_operators` asserts.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moetion.moe import MoELayer

KINDS = ("expert", "router", "dense")
_ADAM_STEP_BYTES = 4  # torch keeps Adam's ``step`` as a float32 scalar per parameter


@dataclass(frozen=True)
class Operator:
    """A named group of parameters snapshotted together.

    ``param_names`` are names in the stage module's ``named_parameters()``; ``numel`` their total
    element count; ``num_tensors`` how many parameter tensors (each has its own Adam ``step``).
    """

    name: str
    kind: str
    param_names: tuple[str, ...]
    numel: int
    num_tensors: int

    def full_bytes(self, *, optimizer_bytes_per_param: int = 8) -> int:
        """fp32 master weights plus every optimizer tensor (Adam: exp_avg, exp_avg_sq, step)."""
        return self.numel * (4 + optimizer_bytes_per_param) + self.num_tensors * _ADAM_STEP_BYTES

    def compute_bytes(self, *, precision: str) -> int:
        """The weights forward reads: bf16 copies under bf16, the fp32 weights under fp32."""
        return self.numel * (2 if precision == "bf16" else 4)


def discover_operators(module: nn.Module) -> list[Operator]:
    """The operators of a stage module, in module order (experts, router, then dense per layer)."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    groups: dict[str, tuple[str, list[str]]] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, MoELayer):
            for e in range(sub.num_experts):
                prefix = f"{name}.experts.{e}."
                groups[f"{name}.experts.{e}"] = ("expert", [n for n in params if n.startswith(prefix)])
            groups[f"{name}.router"] = ("router", [n for n in params if n.startswith(f"{name}.router.")])
    claimed = {n for _, names in groups.values() for n in names}
    for name in params:
        if name not in claimed:
            layer = _layer_prefix(name)
            groups.setdefault(layer, ("dense", []))[1].append(name)
    operators = [
        Operator(op, kind, tuple(names), sum(params[n].numel() for n in names), len(names))
        for op, (kind, names) in groups.items()
        if names
    ]
    owned = [n for op in operators for n in op.param_names]
    assert sorted(owned) == sorted(params), "every trainable parameter must belong to exactly one operator"
    return operators


def _layer_prefix(param_name: str) -> str:
    """``layers.3.attn.qkv.weight`` -> ``layers.3``; ``tied.embed.weight`` -> ``tied.embed``."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]
