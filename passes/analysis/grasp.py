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
logits are divided by ``temperature`` (200 in GraSP) in both passes, so each batch costs two
forwards, a backward and a double backward. Hg is taken over the scored weights:
``params=prunable`` restricts g to linear and conv weights, as the reference code does; the
default ``all`` also includes biases and norm weights. The model is left bit-identical.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import Node

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.passes.analysis.criterion import DataCriterion
from chop.passes.analysis.scoring import Grads, backward_sums
from chop.pipeline.pass_base import Context, option


@dataclass(frozen=True)
class Grasp(DataCriterion):
    """GraSP: saliency θ ⊙ Hg (the negated GraSP score, so mask keeps what GraSP keeps)."""

    name: ClassVar[str] = "grasp"

    temperature: float = option(200.0, "divide the logits by this before the loss (GraSP: 200)")

    def check(self) -> None:
        super().check()
        if not self.temperature > 0:
            raise OptionError(
                f"grasp: temperature={self.temperature} must be positive (GraSP uses 200; "
                "1 means no scaling)"
            )

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        first, again = itertools.tee(ctx.data)  # read twice: once for g, once for Hg
        how = {"bn": self.bn, "accumulate": "sum", "temperature": self.temperature,
               "over_ranks": self.data_parallel()}  # g and Hg of all the ranks' batches
        g = backward_sums(graph, nodes, first, ctx.loss, self.name, times_weight=False, **how)

        def hessian_times_g(grads: Grads, weights: list) -> Grads:
            z = sum((grad * v).sum() for grad, v in zip(grads, g)
                    if grad is not None and grad.requires_grad)
            if not (isinstance(z, torch.Tensor) and z.requires_grad):
                return [None] * len(weights)  # H g = 0: the loss is linear in the weights
            return torch.autograd.grad(z, weights, allow_unused=True)

        return backward_sums(graph, nodes, again, ctx.loss, self.name, second=hessian_times_g,
                             **how)


grasp_saliency = Grasp.compute
