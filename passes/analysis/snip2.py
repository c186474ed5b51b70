"""``snip2``: second-order connection sensitivity |g·w − ½·H_ww·w²|.

Removing weight w changes the loss by L(w = 0) − L(w) ≈ −g·w + ½·H_ww·w² (Taylor to second
order, g = ∂L/∂w, H_ww the Hessian's diagonal entry), so the saliency is |g·w − ½·H_ww·w²|;
without the second term it is SNIP. Over several batches both terms are summed before the
absolute value (like snip's ``abs-of-sum``): per batch, the term g − ½·diag(H)·w from a
double backward, times w.

The Hessian diagonal (``hessian``):

- ``exact``: for each weight tensor, rows of its Hessian block by double backward, many rows at
  once (``torch.autograd.grad(..., is_grads_batched=True)`` with one-hot vectors, ``chunk`` rows
  per call), keeping the diagonal entries. Exact, and N/chunk batched backward passes for N
  scored weights: for small models (refused above ``max_weights``).
- ``hutchinson``: diag(H) ≈ E[z ⊙ Hz] with z Rademacher over all scored weights at once,
  ``samples`` Hessian-vector products (batched ``chunk`` at a time), reproducible from ``seed``;
  unbiased, with variance Σ_{j≠i} H_ij² per entry, for models of any size.

With a process group the per-batch terms are summed over the ranks (``distributed=auto``).
Every rank draws Hutchinson's vectors from the same ``seed``, so they are not the ones one
process scoring all the batches would draw; the estimate is unbiased either way.

The model is left bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import Node

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.passes.analysis.criterion import DataCriterion
from chop.passes.analysis.scoring import Grads, backward_sums
from chop.pipeline.pass_base import Context, option

_BUDGET = 1 << 24  # entries of one batch of one-hot / Rademacher vectors


def hessian_diagonal_exact(
    grad: torch.Tensor | None, weight: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """diag of ∂grad/∂weight for ``grad = ∂L/∂weight`` computed with ``create_graph=True``."""
    diagonal = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    if grad is None or not grad.requires_grad:
        return diagonal.view(weight.shape)  # L is linear in this weight
    n = weight.numel()
    rows = max(1, min(chunk, _BUDGET // max(n, 1), n))
    for start in range(0, n, rows):
        index = torch.arange(start, min(start + rows, n), device=weight.device)
        onehot = torch.zeros(len(index), n, dtype=weight.dtype, device=weight.device)
        onehot[torch.arange(len(index)), index] = 1
        (block,) = torch.autograd.grad(
            grad, weight, onehot.view(len(index), *weight.shape),
            is_grads_batched=True, retain_graph=True, allow_unused=True,
        )
        if block is not None:
            diagonal[index] = block.reshape(len(index), n)[torch.arange(len(index)), index].detach()
    return diagonal.view(weight.shape)


def hessian_diagonal_hutchinson(
    grads: list[torch.Tensor | None],
    weights: list[torch.Tensor],
    samples: int,
    generator: torch.Generator,
    chunk: int = 256,
) -> list[torch.Tensor]:
    """E[z ⊙ Hz] over ``samples`` Rademacher vectors z spanning all ``weights`` together."""
    estimate = [torch.zeros_like(w, memory_format=torch.contiguous_format) for w in weights]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return estimate
    total = sum(weights[i].numel() for i in live)
    per_call = max(1, min(chunk, _BUDGET // max(total, 1)))
    done = 0
    while done < samples:
        s = min(per_call, samples - done)
        zs = [
            (torch.randint(0, 2, (s, *weights[i].shape), generator=generator) * 2 - 1)
            .to(weights[i].dtype).to(weights[i].device)
            for i in live
        ]
        hz = torch.autograd.grad(
            [grads[i] for i in live], [weights[i] for i in live], zs,
            is_grads_batched=True, retain_graph=True, allow_unused=True,
        )
        for i, z, h in zip(live, zs, hz):
            if h is not None:
                estimate[i] += (z * h.detach()).sum(0)
        done += s
    return [e / samples for e in estimate]


@dataclass(frozen=True)
class Snip2(DataCriterion):
    """Second-order SNIP |g·w − ½·H_ww·w²|, Hessian diagonal exact or by Hutchinson."""

    name: ClassVar[str] = "snip2"
    counts: ClassVar[tuple[str, ...]] = ("batches", "samples", "chunk", "max_weights")

    hessian: Literal["exact", "hutchinson"] = option(
        "exact", "Hessian diagonal: exact (small models) or Hutchinson's estimate E(z ⊙ Hz)"
    )
    samples: int = option(100, "Rademacher samples per batch for hessian=hutchinson")
    seed: int = option(0, "seed of the Rademacher samples")
    chunk: int = option(256, "Hessian rows (or samples) computed per batched double backward")
    max_weights: int = option(100_000, "hessian=exact refuses models with more scored weights")

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        count = sum(graph.parameter(n).numel() for n in nodes)
        if self.hessian == "exact" and count > self.max_weights:
            raise OptionError(
                f"snip2: hessian=exact needs one Hessian row per weight, and {graph.name} has "
                f"{count} scored weights, above max_weights={self.max_weights}; use "
                "hessian=hutchinson (with samples=...), params=prunable, or raise max_weights"
            )
        generator = torch.Generator().manual_seed(self.seed)

        def taylor(grads: Grads, weights: list) -> Grads:  # g − ½·diag(H)·w, times w by the loop
            if self.hessian == "exact":
                diagonal = [hessian_diagonal_exact(g, w, self.chunk) for g, w in zip(grads, weights)]
            else:
                diagonal = hessian_diagonal_hutchinson(
                    list(grads), weights, self.samples, generator, self.chunk)
            return [None if g is None else g.detach() - 0.5 * h * w.detach()
                    for g, h, w in zip(grads, diagonal, weights)]

        return backward_sums(graph, nodes, ctx.data, ctx.loss, self.name, bn=self.bn,
                             second=taylor, over_ranks=self.data_parallel())


snip2_saliency = Snip2.compute
