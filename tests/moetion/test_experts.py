"""Expert discovery for the user's own layouts, the declaration hook, and the warning for a layer
that looks like MoE but maps to no experts."""
import logging

import pytest
from torch import nn

import moetion
from moetion.errors import ConfigError
from moetion.operators import discover_operators

import layout_models as models


def operators_of(layer):
    return {op.name: op for op in discover_operators(nn.Sequential(layer))}


def test_a_module_list_of_user_class_experts_is_one_operator_per_expert():
    ops = operators_of(models.ListMoE())
    assert [n for n, op in ops.items() if op.kind == "expert"] == [f"0.experts.{e}" for e in range(4)]
    assert ops["0.router"].param_names == ("0.gate.weight",) and not any(op.kind == "dense" for op in ops.values())


def test_stacked_tensors_are_detected_and_declared_as_slices():
    for layer, names in [(models.GroupedMoE(), ("0.w1", "0.w2")), (models.DeclaredMoE(), ("0.up", "0.down"))]:
        ops = operators_of(layer)
        sliced = [op for op in ops.values() if op.sliced]
        assert [op.expert for op in sliced] == [0, 1, 2, 3] and all(op.param_names == names for op in sliced)
        assert sliced[0].numel == sum(layer.get_parameter(n[2:]).numel() for n in names) // 4


def test_the_protocol_maps_a_layer_and_a_bad_declaration_is_a_clear_error():
    class Protocol(models.DeclaredMoE):
        def __init__(self):
            super().__init__()
            object.__delattr__(self, "_moetion_expert_layout")

        def moetion_experts(self):
            return moetion.ExpertLayout(stacked=("up", "down"), router=("scorer",))

    assert sum(op.sliced for op in operators_of(Protocol()).values()) == 4
    with pytest.raises(ConfigError, match="no parameter"):
        moetion.experts(models.GroupedMoE(), stacked=["w3"])
    with pytest.raises(ConfigError, match="expert_dim=0"):
        moetion.experts(models.GroupedMoE(), stacked=["w1"], expert_dim=1)


def test_the_unmapped_moe_warning_names_the_layer_once_and_spares_dense_and_mapped_layers(caplog):
    model = nn.ModuleDict({"opaque": models.BufferedBlock(), "dense": nn.Linear(8, 8),
                           "grouped": models.GroupedMoE(), "listed": models.ListMoE()})
    with caplog.at_level(logging.WARNING, logger="moetion.experts"):
        discover_operators(model)
        discover_operators(model)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("opaque (BufferedBlock) looks like a MoE layer") and "moetion.experts(" in warning


def test_operator_kinds_are_counted_for_the_start_up_log():
    from moetion.operators import describe_kinds, kind_counts
    model = nn.ModuleDict({"listed": models.ListMoE(), "grouped": models.GroupedMoE(), "dense": nn.Linear(8, 8)})
    counts = kind_counts(discover_operators(model))
    assert counts == {"expert": 8, "router": 2, "dense": 1}
    assert describe_kinds(counts) == "8 expert operators, 3 dense (2 routers)"
