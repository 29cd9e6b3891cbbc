"""The built-in top-k Mixture-of-Experts layer.

Deterministic by construction: router noise comes from the step's generator, capacity dropping
gives priority by (choice rank, token position) as in GShard. Tokens travel to their experts in a
capacity-padded buffer ``[experts, capacity, d_model]`` (GShard's dispatch), so under expert
parallelism the all-to-all's split sizes are static; each expert runs on exactly its kept tokens,
in slot order, and a token's expert outputs are added in choice order. Dispatch and combine are
gathers only, never ``index_add``/``scatter_add``/``index_select``: on CUDA those accumulate with
atomics in an order that changes from run to run (unless torch's deterministic mode swaps them),
which would break bitwise replay; the gathers' backward accumulates with
``index_put_(accumulate=True)``, deterministic on CPU and CUDA. The load-balancing loss (Switch
Transformer's) enters the backward pass through an identity op on the output, so the loss is
never threaded through the pipeline's activations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetion import expert_parallel as ep
from moetion import random as mrandom
from moetion.experts import ExpertLayout
from moetion.routing import report_token_counts


class Expert(nn.Module):
    """One feed-forward expert: Linear -> GELU -> Linear."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_hidden)
        self.down = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Router(nn.Module):
    """The gate: a linear map from tokens to expert logits, with optional multiplicative jitter."""

    def __init__(self, d_model: int, num_experts: int, *, noise: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.noise = noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise > 0:
            jitter = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            jitter.uniform_(1.0 - self.noise, 1.0 + self.noise, generator=mrandom.generator(x.device))
            x = x * jitter.to(x.dtype)
        return self.gate(x).float()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output`` whose backward also feeds ``scale`` as the gradient of ``aux``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=grad_output.device)
        return grad_output, aux_grad, None


def attach_aux_loss(output: torch.Tensor, aux: torch.Tensor, *, coef: float) -> torch.Tensor:
    """Adds ``coef * aux`` (a scalar load-balancing loss) to the training objective from inside a layer.

    Returns ``output`` unchanged (an identity op); its backward feeds ``coef`` times the main loss's
    scale (``1/micro_batches``) as the gradient of ``aux``, so the auxiliary loss enters backward on
    the stage that computed it and never crosses a stage boundary. Call it in ``forward`` on the
    layer's output, while training, as the built-in :class:`MoELayer` does.
    """
    return _AttachAuxLoss.apply(output, aux, coef * mrandom.current().loss_scale)


class MoELayer(nn.Module):
    """Top-k routed experts with a capacity limit and a load-balancing auxiliary loss.

    Args:
        capacity_factor: each expert takes at most ``ceil(factor * tokens * top_k / experts)``
            tokens per micro-batch; the rest of its assignments are dropped (the residual
            connection around the layer carries those tokens on).
        aux_loss_coef: weight of the Switch load-balancing loss ``E * sum_e f_e * P_e``.

    It reports the tokens routed to each expert (before capacity dropping) with
    :func:`~moetion.routing.report_token_counts`; sparse checkpointing orders experts by this popularity.

    Under expert parallelism (:meth:`shard_experts`) the layer keeps only its block of experts in
    ``experts`` (a ``ModuleDict`` keyed by global expert index, so parameter names stay those of the
    unsharded model) and exchanges the dispatch buffer with its expert-parallel group.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        aux_loss_coef: float = 0.01,
        router_noise: float = 0.0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef = aux_loss_coef
        self.router = Router(d_model, num_experts, noise=router_noise)
        self.experts: nn.ModuleList | nn.ModuleDict = nn.ModuleList(Expert(d_model, d_hidden) for _ in range(num_experts))
        self.shard = ep.ExpertShard()
        self.last_aux_loss = torch.zeros(())
        self.last_dropped = torch.zeros((), dtype=torch.int64)
        # Expert parallelism: one gradient-accumulating alias of each local expert parameter per
        # source rank (see begin_iteration), and under bf16 their fp32 sums over micro-batches.
        self._sources: list[dict[int, dict[str, torch.Tensor]]] | None = None
        self._summed: list[dict[tuple[int, str], torch.Tensor]] | None = None

    def capacity(self, tokens: int) -> int:
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def local_experts(self) -> list[tuple[int, Expert]]:
        """(global index, expert) of the experts this rank holds, in index order."""
        return [(e, self.experts[str(e)] if isinstance(self.experts, nn.ModuleDict) else self.experts[e])
                for e in self.shard.local_experts(self.num_experts)]

    def shard_experts(self, shard: ep.ExpertShard) -> None:
        """Keeps only the experts ``shard`` owns (built whole first, so each keeps its initial weights)."""
        if self.num_experts % shard.size:
            raise ValueError(f"{shard.size} expert-parallel ranks cannot share {self.num_experts} experts evenly")
        kept = {str(e): self.experts[e] for e in shard.local_experts(self.num_experts)}
        self.shard = shard
        self.experts = nn.ModuleDict(kept)

    def moetion_experts(self) -> ExpertLayout:
        """The snapshot operators: one per expert this rank holds (named by global index), the router."""
        local = self.shard.local_experts(self.num_experts)
        return ExpertLayout(modules=tuple(f"experts.{e}" for e in local), router=("router",), first_expert=local.start)

    # -- per-source gradients (expert parallelism) ------------------------------------------------
    def begin_iteration(self) -> None:
        """Gives each source rank its own gradient-accumulating alias of every local expert parameter.

        Data parallelism accumulates each replica's expert gradients over its micro-batches and then
        sums the replicas; an expert owner that accumulated all sources into one ``.grad`` would add
        the same numbers in another order. The aliases share the parameters' storage (no copy).
        """
        if self.shard.size == 1:
            return
        self._sources = [
            {e: {n: p.detach().requires_grad_(p.requires_grad) for n, p in expert.named_parameters()}
             for e, expert in self.local_experts()}
            for _ in range(self.shard.size)
        ]
        self._summed = [{} for _ in range(self.shard.size)]

    def after_backward(self) -> None:
        """After each micro-batch's backward, under bf16: moves the sources' gradients into fp32 sums,
        as :meth:`~moetion.precision.StagePrecision.after_backward` does for a replica's parameters
        (fp32 aliases accumulate in place, like parameters)."""
        if self._sources is None:
            return
        for source, summed in zip(self._sources, self._summed):
            for e, params in source.items():
                for name, alias in params.items():
                    if alias.grad is None or alias.dtype == torch.float32:
                        continue
                    grad = alias.grad.float()
                    if (e, name) in summed:
                        summed[(e, name)].add_(grad)
                    else:
                        summed[(e, name)] = grad
                    alias.grad = None

    def fold_source_grads(self, master: "MoELayer") -> None:
        """Sets the gradient of each local expert parameter of ``master`` (this layer, or the fp32
        layer this bf16 copy computes for) to the sources' gradients summed in rank order (a source
        that sent no token counts as zeros), as data parallelism sums replicas."""
        if self._sources is None:
            return
        masters = dict(master.local_experts())
        for e, _ in self.local_experts():
            for name, param in masters[e].named_parameters():
                grads = [summed.get((e, name), source[e][name].grad)
                         for source, summed in zip(self._sources, self._summed)]
                if all(g is None for g in grads):
                    continue
                total = grads[0] if grads[0] is not None else torch.zeros_like(param)
                for g in grads[1:]:
                    total = total + (g if g is not None else torch.zeros_like(param))
                param.grad = total
        self._sources = self._summed = None

    def discard_source_grads(self) -> None:
        """Forgets an abandoned iteration's per-source gradients."""
        self._sources = self._summed = None

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        n = tokens.shape[0]
        probs = torch.softmax(self.router(tokens), dim=-1)  # fp32 [n, E]
        weights, choices = probs.topk(self.top_k, dim=-1)  # [n, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)

        # Assignment order: every token's first choice before any second choice, then by position.
        expert_of = choices.t().reshape(-1)  # [k*n]
        token_of = torch.arange(n, device=x.device).repeat(self.top_k)
        weight_of = weights.t().reshape(-1)
        one_hot = F.one_hot(expert_of, self.num_experts)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        capacity = self.capacity(n)
        kept = position < capacity
        with torch.no_grad():
            report_token_counts(self, torch.bincount(expert_of, minlength=self.num_experts))
            self.last_dropped = (~kept).sum()

        out = self._dispatch_and_combine(tokens, expert_of, token_of, weight_of, kept, position, capacity)

        if self.training and self.aux_loss_coef > 0:
            fraction = torch.bincount(choices[:, 0], minlength=self.num_experts).float() / n
            aux = self.num_experts * (fraction * probs.mean(dim=0)).sum()
            self.last_aux_loss = aux.detach()
            out = attach_aux_loss(out, aux, coef=self.aux_loss_coef)
        return out.reshape(shape)

    def _dispatch_and_combine(self, tokens: torch.Tensor, expert_of: torch.Tensor, token_of: torch.Tensor,
                              weight_of: torch.Tensor, kept: torch.Tensor, position: torch.Tensor,
                              capacity: int) -> torch.Tensor:
        """Runs each expert on its kept assignments and sums every token's weighted outputs.

        Slot ``(e, c)`` of the padded buffer holds expert ``e``'s ``c``-th kept token, gathered from
        ``[tokens; 0]`` (an empty slot reads the zero row); results come back to assignments
        (choice-major, ``k * n``) by a gather from ``[results; 0]`` (a dropped assignment reads the
        zero row), and a token's ``k`` weighted results are added in choice order.
        """
        n, width = tokens.shape
        slot = expert_of[kept] * capacity + position[kept]
        empty = self.num_experts * capacity  # the zero row's index, in both gathers
        source = torch.full((empty,), n, dtype=torch.int64, device=tokens.device)
        source[slot] = token_of[kept]
        dispatched = torch.cat([tokens, tokens.new_zeros(1, width)])[source]
        filled = torch.bincount(expert_of[kept], minlength=self.num_experts)
        results = self._run_experts(dispatched, filled, capacity)
        row_of = torch.full_like(expert_of, empty)
        row_of[kept] = slot
        rows = torch.cat([results, results.new_zeros(1, width)])[row_of]
        contributions = (rows * weight_of.unsqueeze(-1).to(rows.dtype)).view(self.top_k, n, width)
        out = contributions[0]
        for choice in contributions[1:]:
            out = out + choice
        return out.to(tokens.dtype)

    def _run_experts(self, dispatched: torch.Tensor, filled: torch.Tensor, capacity: int) -> torch.Tensor:
        """Expert outputs for the padded buffer ``[E*C, d]`` (zeros in empty slots), same layout."""
        if self.shard.size == 1:
            return _expert_outputs(dispatched, filled.tolist(), capacity, [
                (lambda z, expert=expert: expert(z)) for _, expert in self.local_experts()])
        group = ep.current_group()
        if group is None:
            raise RuntimeError("an expert-parallel MoELayer ran outside its expert group "
                               "(moetion.expert_parallel.expert_group)")
        # Slots are expert-major and experts are in blocks: chunk j of the buffer is rank j's.
        received = ep.all_to_all(dispatched, group)  # [sources x local experts x C, d]
        counts = ep.exchange(filled, group).tolist()  # kept tokens per (source, local expert)
        local = self.local_experts()
        runners = []
        for source in range(self.shard.size):
            for e, expert in local:
                params = self._sources[source][e] if self._sources is not None else dict(expert.named_parameters())
                runners.append(lambda z, expert=expert, params=params: torch.func.functional_call(expert, params, (z,)))
        outputs = _expert_outputs(received, counts, capacity, runners)
        return ep.all_to_all(outputs, group)


def _expert_outputs(buffer: torch.Tensor, filled: list[int], capacity: int, runners: list) -> torch.Tensor:
    """Runs ``runners[i]`` on the ``filled[i]`` leading rows of the ``i``-th capacity block of
    ``buffer``; one split in, one concatenation out, so no gradient is ever summed across blocks.

    Empty slots hold the dispatch's zero row; their outputs are those zeros times 0 (still zeros),
    which keeps the result in the autograd graph of ``buffer`` even when no expert ran, so that an
    expert-parallel rank runs the backward all-to-all whatever its experts received.
    """
    sizes = [size for count in filled for size in (count, capacity - count)]
    pieces = buffer.split(sizes)
    out = []
    for i, run in enumerate(runners):
        kept, empty = pieces[2 * i], pieces[2 * i + 1]
        out.append(run(kept) if filled[i] else kept.mul(0))
        out.append(empty.mul(0))
    return torch.cat(out)
