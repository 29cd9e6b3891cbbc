"""The built-in MoE layer: capacity dropping, token counts, the auxiliary loss, determinism."""
import math

import pytest
import torch

from moetion.moe import MoELayer
from moetion.routing import TokenCounts
from moetion.random import StepContext, step_context


def layer(**kwargs):
    torch.manual_seed(0)
    return MoELayer(8, 16, 4, **kwargs)


def run(moe, x, *, iteration=0, loss_scale=0.25):
    with step_context(StepContext(seed=1, iteration=iteration, micro_batch=0, loss_scale=loss_scale, layer=3)):
        return moe(x)


def test_capacity_limits_tokens_per_expert_and_counts_routed_tokens():
    moe = layer(top_k=2, capacity_factor=0.5)
    seen = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    x = torch.randn(2, 16, 8)
    run(moe, x)
    assert max(seen) <= moe.capacity(32) == math.ceil(0.5 * 32 * 2 / 4)
    assert int(moe.last_dropped) == 64 - sum(seen) > 0
    stage = TokenCounts(moe)
    counts = stage.pop()[""]
    assert counts.sum() == 64 and counts.shape == (4,)
    run(moe, x)
    assert stage.pop()[""].sum() == 64  # counted afresh after each pop


def test_dropped_tokens_contribute_nothing():
    moe = layer(top_k=1, capacity_factor=1e-9)  # capacity 1: one token per expert survives
    out = run(moe, torch.randn(1, 10, 8))
    assert (out.reshape(10, 8).abs().sum(dim=-1) > 0).sum() <= 4


def test_aux_loss_gradient_reaches_the_router_with_the_loss_scale():
    moe = layer(top_k=2, aux_loss_coef=0.5, capacity_factor=4.0)
    x = torch.randn(3, 5, 8)
    out = run(moe, x, loss_scale=0.25)
    out.backward(torch.zeros_like(out))  # only the auxiliary loss produces a gradient
    got = moe.router.gate.weight.grad.clone()

    tokens = x.reshape(-1, 8)
    probs = torch.softmax(moe.router.gate(tokens).float(), dim=-1)
    fraction = torch.bincount(probs.argmax(-1), minlength=4).float() / tokens.shape[0]
    aux = 4 * (fraction * probs.mean(0)).sum()
    (expected,) = torch.autograd.grad(aux * 0.5 * 0.25, moe.router.gate.weight)
    assert torch.allclose(got, expected, atol=1e-7) and got.abs().sum() > 0
    assert float(moe.last_aux_loss) == pytest.approx(float(aux.detach()))


def test_router_noise_replays_and_varies_by_iteration():
    moe = layer(router_noise=0.3)
    x = torch.randn(2, 6, 8)
    first = run(moe, x, iteration=4)
    torch.manual_seed(77)
    assert torch.equal(run(moe, x, iteration=4), first)
    assert not torch.equal(run(moe, x, iteration=5), first)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(4, 4, 2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(4, 4, 2, capacity_factor=0)


def test_dispatch_and_combine_use_no_atomic_accumulation():
    """index_add/scatter_add (and index_select, whose backward is index_add) accumulate with atomics
    on CUDA: the layer must not call them in forward or backward, on any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    moe = layer(top_k=2, capacity_factor=0.75)
    x = torch.randn(2, 6, 8, requires_grad=True)
    with Ops() as ops:
        out = run(moe, x)
        out.sum().backward()
    atomic = {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_select", "scatter_reduce"}
    assert "index_put_" in ops.seen or "index_put" in ops.seen  # the oracle sees backward ops
    assert not ops.seen & atomic, sorted(ops.seen & atomic)
