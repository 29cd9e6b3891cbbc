"""DeepSpeed layer specs (issue 18, item 5): moetion.PipelineModule takes a layer list written for
``deepspeed.pipe`` as it is. The real ``deepspeed`` package is too heavy to install for the tests, so
two small classes below carry the attributes moetion recognises a DeepSpeed spec by (written here,
not taken from DeepSpeed)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moetion
from moetion.errors import ConfigError
from moetion.reference import train_reference

VOCAB, D = 32, 8


class DSLayerSpec:
    """What moetion reads of ``deepspeed.pipe.LayerSpec``."""

    def __init__(self, typename, *module_args, **module_kwargs):
        self.typename, self.module_args, self.module_kwargs = typename, module_args, module_kwargs


class DSTiedLayerSpec(DSLayerSpec):
    """What moetion reads of ``deepspeed.pipe.TiedLayerSpec``."""

    def __init__(self, key, typename, *module_args, forward_fn=None, tied_weight_attr=("weight",), **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key, self.forward_fn, self.tied_weight_attr = key, forward_fn, tied_weight_attr


class Embedding(nn.Module):
    """Token embedding whose weight the LM head reuses; parameters: ``weight`` only."""

    def __init__(self, vocab, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, d) * 0.1)

    def forward(self, tokens):
        return self.weight[tokens]


def head(embedding, x):
    return x @ embedding.weight.t()


def layers(spec, tied, **tie):
    return [tied("embed", Embedding, VOCAB, D, **tie), spec(nn.Linear, D, D), lambda x: F.gelu(x),
            spec(nn.Linear, D, D), spec(nn.LayerNorm, D), tied("embed", Embedding, VOCAB, D, forward_fn=head, **tie)]


def loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


class Tokens:
    def micro_batch(self, iteration, index):
        g = torch.Generator().manual_seed(97 * iteration + index)
        x = torch.randint(0, VOCAB, (2, 5), generator=g)
        return x, x.roll(1, dims=-1)


def moetion_layers():
    def tied(key, cls, *args, forward_fn=None):
        return moetion.TiedLayerSpec(key, cls, *args, forward_fn=forward_fn)
    return layers(moetion.LayerSpec, tied)


def test_a_deepspeed_layer_list_builds_the_same_stages_as_moetions_own_specs():
    for stage in range(3):
        ours = moetion.PipelineModule(moetion_layers(), 3, loss_fn=loss, stage_id=stage, partition_method="uniform")
        theirs = moetion.PipelineModule(layers(DSLayerSpec, DSTiedLayerSpec), 3, loss_fn=loss, stage_id=stage,
                                        partition_method="uniform")
        assert theirs.parts == ours.parts and theirs.tied_stages() == ours.tied_stages() == {"embed": [0, 2]}
        assert theirs.state_dict().keys() == ours.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))


def test_a_deepspeed_layer_list_trains_like_moetions_own_specs():
    def train(specs):
        return train_reference(layers=specs, num_stages=3, loss_fn=loss, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                               config=moetion.Config.from_dict({"micro_batches": 2}), data=Tokens(), iterations=2,
                               partition_method="uniform").losses
    assert train(layers(DSLayerSpec, DSTiedLayerSpec, tied_weight_attr="weight")) == train(moetion_layers())


def test_a_tied_module_with_parameters_deepspeed_would_not_tie_is_refused():
    specs = [DSTiedLayerSpec("proj", nn.Linear, D, D), DSLayerSpec(nn.Linear, D, D)]
    with pytest.raises(ConfigError, match=r"ties \['weight'\] but the module also has parameters \['bias'\]"):
        moetion.PipelineModule(specs, 1, loss_fn=loss, stage_id=0)
    with pytest.raises(TypeError, match="a layer is int; expected LayerSpec, TiedLayerSpec"):
        moetion.PipelineModule([DSLayerSpec(nn.Linear, D, D), 3], 1, loss_fn=loss, stage_id=0)
