"""``snip2``: second-order connection sensitivity |g·w − ½·H_ww·w²|.

Removing weight w changes the loss by L(w = 0) − L(w) ≈ −g·w + ½·H_ww·w² (Taylor to second
order, g = ∂L/∂w, H_ww the Hessian's diagonal entry), so the saliency is |g·w − ½·H_ww·w²|;
without the second term it is SNIP. Over several batches both terms are summed before the
absolute value (like snip's ``abs-of-sum``).

The Hessian diagonal (``hessian``):

- ``exact``: for each weight tensor, rows of its Hessian block by double backward, many rows at
  once (``torch.autograd.grad(..., is_grads_batched=True)`` with one-hot vectors, ``chunk`` rows
  per call), keeping the diagonal entries. Exact, and N/chunk batched backward passes for N
  scored weights: for small models (refused above ``max_weights``).
- ``hutchinson``: diag(H) ≈ E[z ⊙ Hz] with z Rademacher over all scored weights at once,
  ``samples`` Hessian-vector products (batched ``chunk`` at a time), reproducible from ``seed``;
  unbiased, with variance Σ_{j≠i} H_ij² per entry, for models of any size.

The model is left bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from chop.passes.analysis.common import (
    PARAMS_DOC,
    Params,
    batch_losses,
    differentiable_twice,
    grads_or_zeros,
    scored_nodes,
    scoring,
    store_saliency,
)

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option

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


def snip2_saliency(
    graph: Graph,
    data: Iterable,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    batches: int = 1,
    bn: str = "eval",
    hessian: str = "exact",
    samples: int = 100,
    seed: int = 0,
    chunk: int = 256,
    max_weights: int = 100_000,
    params: Params = "all",
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
) -> dict[str, torch.Tensor]:
    """Write saliency |Σ_b (g_b·w − ½·diag(H_b)·w²)| on the scored weight nodes."""
    nodes = scored_nodes(graph, params)
    count = sum(graph.parameter(n).numel() for n in nodes)
    if hessian == "exact" and count > max_weights:
        raise OptionError(
            f"snip2: hessian=exact needs one Hessian row per weight, and {graph.name} has {count} "
            f"scored weights, above max_weights={max_weights}; use hessian=hutchinson (with "
            f"samples=...), params=prunable, or raise max_weights"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = take(data, batches, "snip2")
    if track is not None:
        chosen = track(chosen, batches, "snip2")
    with scoring(graph, nodes, bn=bn) as weights, differentiable_twice():
        first = [torch.zeros_like(w) for w in weights]
        second = [torch.zeros_like(w) for w in weights]
        for value in batch_losses(graph.module, chosen, loss, "snip2"):
            grads = torch.autograd.grad(value, weights, create_graph=True, allow_unused=True)
            if hessian == "exact":
                diagonal = [hessian_diagonal_exact(g, w, chunk) for g, w in zip(grads, weights)]
            else:
                diagonal = hessian_diagonal_hutchinson(grads, weights, samples, generator, chunk)
            for f, s, g, h in zip(first, second, grads_or_zeros(grads, weights), diagonal):
                f.add_(g.detach())
                s.add_(h)
        scores = [
            (f * w.detach() - 0.5 * s * w.detach().square()).abs()
            for f, s, w in zip(first, second, weights)
        ]
    return store_saliency(graph, nodes, scores)


@dataclass(frozen=True)
class Snip2(Pass):
    """Second-order SNIP |g·w − ½·H_ww·w²|, Hessian diagonal exact or by Hutchinson."""

    name: ClassVar[str] = "snip2"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    batches: int = option(1, "batches of data to score on")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    hessian: Literal["exact", "hutchinson"] = option(
        "exact", "Hessian diagonal: exact (small models) or Hutchinson's estimate E(z ⊙ Hz)"
    )
    samples: int = option(100, "Rademacher samples per batch for hessian=hutchinson")
    seed: int = option(0, "seed of the Rademacher samples")
    chunk: int = option(256, "Hessian rows (or samples) computed per batched double backward")
    max_weights: int = option(100_000, "hessian=exact refuses models with more scored weights")
    params: Literal["all", "prunable"] = option("all", PARAMS_DOC)

    def check(self) -> None:
        for key in ("batches", "samples", "chunk", "max_weights"):
            if getattr(self, key) < 1:
                raise OptionError(f"snip2: {key}={getattr(self, key)} must be at least 1")

    def data_batches(self) -> int:
        return self.batches

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = snip2_saliency(
            graph, ctx.data, ctx.loss, batches=self.batches, bn=self.bn, hessian=self.hessian,
            samples=self.samples, seed=self.seed, chunk=self.chunk,
            max_weights=self.max_weights, params=self.params, track=ctx.track,
        )
        return PassResult(modified=False, info={"scored": len(scores)})
