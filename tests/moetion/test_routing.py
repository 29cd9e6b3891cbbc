"""Routing statistics for the user's own MoE layers (issue 17, item 5): a layer reports its per-expert
token counts through moetion.report_token_counts; one that reports none (or the wrong number) is
ordered by expert name with a note naming it, never an error."""
import logging

import pytest
import torch
from torch import nn

import moetion
from moetion.errors import ConfigError
from moetion.operators import discover_operators
from moetion.routing import TokenCounts, expert_counts
from moetion.window import snapshot_order

import layout_models as models


class MiscountingMoE(models.DeclaredMoE):
    def forward(self, x):
        moetion.report_token_counts(self, torch.ones(3, dtype=torch.int64))  # 3 counts for 4 experts
        return super().forward(x)


def test_a_user_layer_reports_token_counts_and_the_snapshot_order_follows_them(caplog):
    torch.manual_seed(0)
    model = nn.ModuleDict({"grouped": models.GroupedMoE(), "listed": models.ListMoE(), "miscounting": MiscountingMoE(),
                           "dense": nn.Linear(models.D_MODEL, models.D_MODEL)}).eval()  # eval: no aux loss
    counter = TokenCounts(model)
    assert [name for name, _, _ in counter.layers] == ["grouped", "listed", "miscounting"]
    x = torch.randn(6, models.D_MODEL)
    with caplog.at_level(logging.INFO, logger="moetion.routing"):
        for _ in range(2):  # two forwards add up until the next pop
            for name in ("grouped", "listed", "miscounting"):
                model[name](x)
        counts = counter.pop()
        expected = 2 * torch.bincount(models.top_k_dispatch(model["grouped"].router(x), 4)[2], minlength=4)
        assert list(counts) == ["grouped"] and torch.equal(counts["grouped"], expected)
        for name in ("grouped", "listed", "miscounting"):
            model[name](x)
        assert torch.equal(counter.pop()["grouped"], expected // 2)  # counted afresh after each pop; notes once
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2
    assert notes[0].startswith("listed (ListMoE) reports no per-expert token counts: its experts are snapshotted in "
                               "name order (unknown popularity)") and "moetion.report_token_counts" in notes[0]
    assert notes[1].startswith("miscounting (MiscountingMoE) reported 3 token counts for 4 experts")

    operators = discover_operators(model)
    experts = [op for op in operators if op.kind == "expert"]
    popularity = dict(zip((op.name for op in experts), expert_counts([(op.layer, op.expert) for op in experts], counts)))
    assert [popularity[f"grouped.experts.{e}"] for e in range(4)] == expected.tolist()
    assert popularity["listed.experts.0"] == 0.0 and popularity["miscounting.experts.3"] == 0.0
    order = snapshot_order(operators, popularity)
    grouped = [n for n in order if n.startswith("grouped.experts.")]
    assert grouped == sorted(grouped, key=lambda n: (popularity[n], n))


def test_a_malformed_report_is_a_clear_error():
    layer = models.GroupedMoE()
    with pytest.raises(ConfigError, match=r"one count per expert, a 1-D tensor, got shape \(2, 2\)"):
        moetion.report_token_counts(layer, torch.ones(2, 2))
    moetion.report_token_counts(layer, torch.ones(4))
    with pytest.raises(ConfigError, match=r"got shape \(5,\) \(earlier calls reported 4\)"):
        moetion.report_token_counts(layer, torch.ones(5))
