"""Partitioning layer lists into stages, building only a stage's layers, and tied weights."""
import pytest
import torch
from torch import nn

from moetion import LayerSpec, PartitionError, PipelineModule
from moetion.models import GPTMoEConfig, build_gpt_moe_layers, gpt_moe_loss
from moetion.partition import balanced_partition


def test_balanced_partition_minimises_the_heaviest_stage():
    assert balanced_partition([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_partition([10, 1, 1, 1, 1, 10], 3) == [0, 1, 5, 6]
    assert balanced_partition([5], 1) == [0, 1]
    # every stage gets a layer even when the weights would rather put them together
    assert balanced_partition([0, 0, 0, 9], 4) == [0, 1, 2, 3, 4]


def test_balanced_partition_rejects_more_stages_than_layers():
    with pytest.raises(PartitionError, match="cannot split 3 layers into 4 stages"):
        balanced_partition([1, 1, 1], 4)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(40, 40)


def specs():
    return [LayerSpec(Small), LayerSpec(Small), LayerSpec(Big), LayerSpec(Small), LayerSpec(Small), LayerSpec(Big)]


def test_partition_methods():
    by_params = PipelineModule(specs(), 2, partition_method="parameters", stage_id=0)
    assert by_params.parts == [0, 3, 6]
    uniform = PipelineModule(specs(), 3, partition_method="uniform", stage_id=0)
    assert uniform.parts == [0, 2, 4, 6]
    by_type = PipelineModule(specs(), 2, partition_method="type:big", stage_id=1)
    assert [by_type.specs[i].name for i in by_type.stage_layers(1)].count("Big") == 1


def test_bad_partition_methods_are_explained():
    with pytest.raises(PartitionError, match="matches no layer"):
        PipelineModule(specs(), 2, partition_method="type:Attention", stage_id=0)
    with pytest.raises(PartitionError, match="unknown partition_method"):
        PipelineModule(specs(), 2, partition_method="balanced", stage_id=0)
    with pytest.raises(PartitionError, match="cannot split 6 layers into 7 stages"):
        PipelineModule(specs(), 7, stage_id=0)


def test_only_the_owning_stage_builds_a_layer():
    built = []

    def factory(tag):
        built.append(tag)
        return nn.Linear(2, 2)

    layers = [LayerSpec(factory, i) for i in range(4)]
    PipelineModule(layers, 2, partition_method="uniform", stage_id=1)
    assert built == [2, 3]


def test_layer_weights_do_not_depend_on_partition():
    """Each layer is initialised from its own seed, whichever stage builds it."""
    layers = build_gpt_moe_layers(GPTMoEConfig(n_layers=4))
    whole = PipelineModule(layers, 1, loss_fn=gpt_moe_loss, stage_id=0).state_dict()
    for num_stages in (2, 4):
        for stage in range(num_stages):
            part = PipelineModule(layers, num_stages, loss_fn=gpt_moe_loss, stage_id=stage).state_dict()
            for key, value in part.items():
                assert torch.equal(value, whole[key]), key


def test_tied_layer_is_shared_on_one_stage_and_copied_identically_across_stages():
    layers = build_gpt_moe_layers(GPTMoEConfig(n_layers=2))
    single = PipelineModule(layers, 1, loss_fn=gpt_moe_loss, stage_id=0)
    assert list(single.tied) == ["embed"] and single.tied_stages() == {}
    first = PipelineModule(layers, 3, loss_fn=gpt_moe_loss, stage_id=0)
    last = PipelineModule(layers, 3, loss_fn=gpt_moe_loss, stage_id=2)
    assert first.tied_stages() == {"embed": [0, 2]}
    assert first.tied_parameter_owner("embed") == 0
    assert torch.equal(first.tied["embed"].weight, last.tied["embed"].weight)


def test_stage_id_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert PipelineModule(specs(), 4).stage_id == 2  # 2 replicas: ranks 4 and 5 run stage 2
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(Exception, match="not divisible by num_stages=4"):
        PipelineModule(specs(), 4)
