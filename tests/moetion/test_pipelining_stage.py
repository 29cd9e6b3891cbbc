"""LoggedStage refuses what would make its first step change state, before any process group exists."""
import pytest
import torch
from torch import nn

import moetion
from moetion.pipelining import LoggedStage


def test_a_stage_without_static_shapes_is_refused_naming_what_to_pass():
    with pytest.raises(moetion.ConfigError, match="pass input_args= and output_args=.*extra forward and backward"):
        LoggedStage(nn.Linear(4, 4), 0, 2, torch.device("cpu"))


def test_a_later_stage_whose_example_input_needs_no_grad_is_refused():
    with pytest.raises(moetion.ConfigError, match=r"input_args must require grad \(input_args.requires_grad_\(\)\)"):
        LoggedStage(nn.Linear(4, 4), 1, 2, torch.device("cpu"), input_args=torch.empty(2, 4),
                    output_args=torch.empty(2, 4))


def test_a_stage_whose_example_output_needs_no_grad_is_refused():
    """torch derives no gradient buffer for it: the backward would fail in the first step, far from the cause."""
    with pytest.raises(moetion.ConfigError, match=r"output_args must require grad"):
        LoggedStage(nn.Linear(4, 4), 0, 2, torch.device("cpu"), input_args=torch.empty(2, 4),
                    output_args=torch.empty(2, 4))
