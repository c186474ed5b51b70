"""``grasp``: Gradient Signal Preservation (Wang, Zhang & Grosse, ICLR 2020).

GraSP scores weight q by how removing it (δ = −θ_q) changes the gradient norm, to first order:
S(−θ) = −θ ⊙ Hg, with g = ∂L/∂θ and H the Hessian. The paper and its code *remove* the weights
with the highest S (their removal reduces the gradient flow least). chop's ``mask`` keeps the
highest saliency, so the saliency stored here is the negated GraSP score,

    saliency = −S(−θ) = θ ⊙ Hg,

and ``grasp, mask{sparsity=s}`` prunes exactly the weights GraSP prunes (the SynFlow authors'
GraSP implementation uses the same ``θ ⊙ Hg``, keep-highest form). The saliency may be negative;
``chop.kernels.select`` ranks negative floats exactly.

Computation, as in the reference implementation: g = Σ_b ∂L_b/∂θ over the batches (no graph kept),
then Hg = Σ_b ∂/∂θ (∂L_b/∂θ · g), one Hessian-vector product per batch (double backward); the
logits are divided by ``temperature`` (200 in GraSP) in both passes. Hg is taken over the scored
weights: ``params=prunable`` restricts g to linear and conv weights, as the reference code does;
the default ``all`` also includes biases and norm weights. The model is left bit-identical.
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


def grasp_saliency(
    graph: Graph,
    data: Iterable,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    batches: int = 1,
    bn: str = "eval",
    temperature: float = 200.0,
    params: Params = "all",
) -> dict[str, torch.Tensor]:
    """Write saliency θ ⊙ Hg (the negated GraSP score) on the scored weight nodes."""
    nodes = scored_nodes(graph, params)
    chosen = list(take(data, batches, "grasp"))  # read twice: once for g, once for Hg
    with scoring(graph, nodes, bn=bn) as weights, differentiable_twice():
        g = [torch.zeros_like(w) for w in weights]
        for value in batch_losses(graph.module, chosen, loss, "grasp", temperature=temperature):
            for total, grad in zip(g, torch.autograd.grad(value, weights, allow_unused=True)):
                if grad is not None:
                    total.add_(grad.detach())
        hg = [torch.zeros_like(w) for w in weights]
        for value in batch_losses(graph.module, chosen, loss, "grasp", temperature=temperature):
            grads = torch.autograd.grad(value, weights, create_graph=True, allow_unused=True)
            z = sum(
                (grad * v).sum() for grad, v in zip(grads, g)
                if grad is not None and grad.requires_grad
            )
            if isinstance(z, torch.Tensor) and z.requires_grad:  # else H g = 0 (a linear model)
                for total, h in zip(hg, grads_or_zeros(
                        torch.autograd.grad(z, weights, allow_unused=True), weights)):
                    total.add_(h)
        scores = [(w.detach() * h).detach() for w, h in zip(weights, hg)]
    return store_saliency(graph, nodes, scores)


@dataclass(frozen=True)
class Grasp(Pass):
    """GraSP: saliency θ ⊙ Hg (the negated GraSP score, so mask keeps what GraSP keeps)."""

    name: ClassVar[str] = "grasp"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    batches: int = option(1, "batches of data (two forwards and a double backward each)")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    temperature: float = option(200.0, "divide the logits by this before the loss (GraSP: 200)")
    params: Literal["all", "prunable"] = option("all", PARAMS_DOC)

    def check(self) -> None:
        if self.batches < 1:
            raise OptionError(f"grasp: batches={self.batches} must be at least 1")
        if not self.temperature > 0:
            raise OptionError(
                f"grasp: temperature={self.temperature} must be positive (GraSP uses 200; "
                "1 means no scaling)"
            )

    def data_batches(self) -> int:
        return self.batches

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = grasp_saliency(
            graph, ctx.data, ctx.loss, batches=self.batches, bn=self.bn,
            temperature=self.temperature, params=self.params,
        )
        return PassResult(modified=False, info={"scored": len(scores)})
