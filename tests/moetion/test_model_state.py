"""State besides trainable parameters: persistent buffers and frozen parameters are rolled back when
an iteration is abandoned, and a non-persistent buffer that changes is named once."""
import logging

import torch
from torch import nn

from moetion.model_state import CommittedState, state_tensors

from layout_models import BufferedBlock


def test_state_tensors_are_persistent_buffers_and_frozen_parameters():
    block = BufferedBlock()
    block.register_buffer("scratch", torch.zeros(2), persistent=False)
    assert sorted(state_tensors(block)) == ["expert_bias", "frozen_scale", "load", "norm.num_batches_tracked",
                                            "norm.running_mean", "norm.running_var"]


def test_rollback_undoes_an_abandoned_forward_including_in_place_batch_norm_statistics():
    block = BufferedBlock()
    committed = CommittedState(block)
    committed.commit()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    block(torch.randn(6, 8))  # batch norm updates its running statistics without a version bump
    assert not torch.equal(before["norm.running_mean"], block.norm.running_mean)
    committed.rollback()
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_non_persistent_buffer_that_changes_is_named_once(caplog):
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()), persistent=False)
            self.register_buffer("constant", torch.ones(3), persistent=False)

        def forward(self, x):
            self.seen += 1
            return x * self.constant

    module = Counting()
    committed = CommittedState(module)
    with caplog.at_level(logging.WARNING, logger="moetion.model_state"):
        for _ in range(4):
            committed.commit()
            module(torch.ones(3))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'seen'" in warnings[0] and "persistent=True" in warnings[0]
