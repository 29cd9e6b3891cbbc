"""The public auxiliary-loss hook (issue 17, item 7): a MoE layer of the user's own, adding its
load-balancing loss with moetion.attach_aux_loss, trains bit-identically to the built-in MoELayer of
the same arithmetic, with the loss computed on a stage other than the last."""
import torch
import torch.nn.functional as F
from torch import nn

import moetion
from moetion.moe import MoELayer
from moetion.reference import train_reference

import layout_models as models

EXPERTS, HIDDEN, COEF = 4, 16, 0.5


class UserExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(models.D_MODEL, HIDDEN)
        self.down = nn.Linear(HIDDEN, models.D_MODEL)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class UserMoE(nn.Module):
    """Top-2 with capacity and a Switch load-balancing loss, written as a user would (not moetion's classes)."""

    def __init__(self, coef=COEF):
        super().__init__()
        self.coef = coef
        self.gate = nn.Linear(models.D_MODEL, EXPERTS, bias=False)
        self.experts = nn.ModuleList(UserExpert() for _ in range(EXPERTS))

    def forward(self, x):
        probs, choices, expert_of, token_of, weight_of, kept = models.top_k_dispatch(self.gate(x), EXPERTS)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            mask = kept & (expert_of == e)
            index = token_of[mask]
            out = out.index_add(0, index, expert(x[index]) * weight_of[mask, None])
        if self.training and self.coef:
            out = moetion.attach_aux_loss(out, models.switch_aux_loss(probs, choices, EXPERTS), coef=self.coef)
        return out


def train(moe):
    run = train_reference(layers=[moe, moetion.LayerSpec(nn.Linear, models.D_MODEL, models.D_MODEL)], num_stages=2,
                          loss_fn=models.mse, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                          config=moetion.Config.from_dict({"micro_batches": 2, "seed": 3}),
                          data=models.RegressionData(), iterations=2, partition_method="uniform", module_seed=5)
    return run.losses, [p.detach().clone() for stage in run.stages for p in stage.parameters()]


def test_a_user_layers_aux_loss_through_the_public_hook_trains_like_the_built_in_layers():
    builtin = moetion.LayerSpec(MoELayer, models.D_MODEL, HIDDEN, EXPERTS, top_k=models.TOP_K,
                                capacity_factor=models.CAPACITY, aux_loss_coef=COEF)
    losses, params = train(builtin)
    user_losses, user_params = train(moetion.LayerSpec(UserMoE))
    assert user_losses == losses
    assert len(user_params) == len(params) and all(torch.equal(a, b) for a, b in zip(user_params, params))
    # Negative control: without the auxiliary loss the same layer trains differently.
    no_aux_losses, no_aux_params = train(moetion.LayerSpec(UserMoE, coef=0.0))
    assert no_aux_losses != losses and not torch.equal(no_aux_params[0], params[0])  # [0]: the router
