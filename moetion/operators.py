"""Operators: the units of sparse snapshotting on a stage.

One operator per expert of every MoE layer (whatever its layout, see :mod:`moetion.experts`), one
per router, and one per layer for the layer's remaining (dense) parameters; a tied module is one
dense operator. An expert of a stacked layout is a *slice* operator: the slice ``[e]`` of each of
the layer's stacked parameters and of their per-element optimizer state. Every trainable parameter
belongs to exactly one operator, or, when stacked, to one slice operator per expert, which
:func:`discover_operators` asserts.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moetion.experts import layout_of, looks_like_moe, num_stacked_experts, warn_unmapped

KINDS = ("expert", "router", "dense")
OPERATOR_KINDS = "operator_kinds"  # a window manifest's ``extra`` key: the stage's kind_counts()
_ADAM_STEP_BYTES = 4  # torch keeps Adam's ``step`` as a float32 scalar per parameter


@dataclass(frozen=True)
class Operator:
    """A named group of parameters snapshotted together.

    ``param_names`` are names in the stage module's ``named_parameters()``; ``numel`` their total
    element count (of the slice, for a slice operator); ``num_tensors`` how many parameter tensors
    have an Adam ``step`` of their own (0 for a slice: the stacked tensor's step is shared by its
    experts). ``layer`` and ``expert`` place an expert in its MoE layer (token counts are indexed by
    ``expert``); ``sliced`` says the operator is the slice ``[expert]`` of stacked ``param_names``.
    """

    name: str
    kind: str
    param_names: tuple[str, ...]
    numel: int
    num_tensors: int
    layer: str = ""
    expert: int | None = None
    sliced: bool = False

    def full_bytes(self, *, optimizer_bytes_per_param: int = 8) -> int:
        """fp32 master weights plus every optimizer tensor (Adam: exp_avg, exp_avg_sq, step)."""
        return self.numel * (4 + optimizer_bytes_per_param) + self.num_tensors * _ADAM_STEP_BYTES

    def compute_bytes(self, *, precision: str) -> int:
        """The weights forward reads: bf16 copies under bf16, the fp32 weights under fp32."""
        return self.numel * (2 if precision == "bf16" else 4)


def discover_operators(module: nn.Module) -> list[Operator]:
    """The operators of a stage module, in module order (experts, router, then dense per layer)."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    operators: list[Operator] = []
    claimed: set[str] = set()
    mapped: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(f"{m}.") for m in mapped):
            continue  # inside a mapped MoE layer: its experts' own gates are not routers
        layout = layout_of(sub)
        if layout is None:
            if looks_like_moe(sub) and any(p.requires_grad for p in sub.parameters()):
                warn_unmapped(name, sub)
            continue
        mapped.append(name)
        prefix = f"{name}." if name else ""
        for e, child in enumerate(layout.modules):
            names = [n for n in params if n.startswith(f"{prefix}{child}.")]
            operators.append(Operator(f"{prefix}{child}", "expert", tuple(names), sum(params[n].numel() for n in names),
                                      len(names), layer=name, expert=layout.first_expert + e))
        if layout.stacked:
            names = tuple(f"{prefix}{n}" for n in layout.stacked if f"{prefix}{n}" in params)
            count = num_stacked_experts(sub, layout)
            for e in range(count):
                operators.append(Operator(f"{prefix}experts.{e}", "expert", names,
                                          sum(params[n].numel() // count for n in names), 0,
                                          layer=name, expert=e, sliced=True))
        router = [n for n in params if any(n == f"{prefix}{r}" or n.startswith(f"{prefix}{r}.") for r in layout.router)]
        operators.append(Operator(f"{prefix}router", "router", tuple(router), sum(params[n].numel() for n in router),
                                  len(router), layer=name))
        claimed |= {n for op in operators for n in op.param_names}
    dense: dict[str, list[str]] = {}
    for name in params:
        if name not in claimed:
            dense.setdefault(_layer_prefix(name), []).append(name)
    operators = [op for op in operators if op.param_names] + [
        Operator(layer, "dense", tuple(names), sum(params[n].numel() for n in names), len(names))
        for layer, names in dense.items()
    ]
    whole = sorted(n for op in operators if not op.sliced for n in op.param_names)
    stacked = {n for op in operators if op.sliced for n in op.param_names}
    assert sorted(whole + sorted(stacked)) == sorted(params) and not stacked & set(whole), \
        "every trainable parameter must belong to exactly one operator (or, stacked, to one slice per expert)"
    return operators


def kind_counts(operators: list[Operator]) -> dict[str, int]:
    """How many operators of each kind (``expert``, ``router``, ``dense``) a stage has."""
    return {kind: sum(op.kind == kind for op in operators) for kind in KINDS}


def describe_kinds(counts: dict[str, int]) -> str:
    """``"8 expert operators, 3 dense (2 routers)"``: what the start-up log and inspect show."""
    return (f"{counts['expert']} expert operators, {counts['router'] + counts['dense']} dense "
            f"({counts['router']} routers)")


def stacked_parameters(operators: list[Operator]) -> dict[str, int]:
    """Every stacked parameter of the stage and how many experts slice it."""
    counts: dict[str, int] = {}
    for op in operators:
        if op.sliced:
            for name in op.param_names:
                counts[name] = counts.get(name, 0) + 1
    return counts


def _layer_prefix(param_name: str) -> str:
    """``layers.3.attn.qkv.weight`` -> ``layers.3``; ``tied.embed.weight`` -> ``tied.embed``."""
    parts = param_name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]
