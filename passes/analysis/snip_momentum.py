"""``snip-momentum``: SNIP scores averaged over training steps (Intel Neural Compressor).

score_n = alpha·score_{n−1} + beta·|w ⊙ g|, where score_{n−1} is the saliency already on the
weight node (absent: 0) and g the gradient of this step. The defaults (alpha = 1, beta = 0.9)
give the running sum score_{n−1} + 0.9·|w ⊙ g| that the issue specifies; INC's constants
(alpha = 0.9, beta = 1.0) give an exponential moving sum that forgets old steps. Meant for pruning during
training: run it once per step (the ``Pruner`` does) and ``mask`` on the accumulated scores.

g comes from ``source``: ``data`` computes it like ``snip`` from ``batches`` batches
(|Σ_b g_b ⊙ w|); ``grad`` reads the ``.grad`` that the training loop's ``loss.backward()`` left
on the parameters (INC scores in ``on_before_optimizer_step``), with no extra forward or
backward. The model is left bit-identical either way.

INC's code (``SnipMomentumCriterion``: ``scores *= alpha; scores += beta * |w·g|``, alpha = 0.9,
beta = 1.0) decays the previous score instead of summing: ``snip-momentum{alpha=0.9, beta=1.0}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from chop.passes.analysis.common import (
    PARAMS_DOC,
    Params,
    accumulated_gradients,
    scored_nodes,
    store_saliency,
)

from chop.errors import DataError, OptionError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def snip_momentum_saliency(
    graph: Graph,
    data: Iterable | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.9,
    source: str = "data",
    batches: int = 1,
    bn: str = "eval",
    params: Params = "all",
) -> dict[str, torch.Tensor]:
    """Update the saliency of the scored weight nodes to alpha·previous + beta·|w ⊙ g|."""
    nodes = scored_nodes(graph, params)
    if source == "grad":
        weights = [graph.parameter(n) for n in nodes]
        if all(w.grad is None for w in weights):
            raise DataError(
                "snip-momentum{source=grad} found no .grad on the parameters: call "
                "loss.backward() before scoring, or use source=data with data=... batches"
            )
        current = [
            torch.zeros_like(w.detach()) if w.grad is None else (w.detach() * w.grad).abs()
            for w in weights
        ]
    else:
        current = accumulated_gradients(
            graph, nodes, take(data, batches, "snip-momentum"), loss, bn=bn, who="snip-momentum"
        )
    scores = []
    for node, now in zip(nodes, current):
        previous = meta.entries(node).get("saliency")
        score = beta * now
        scores.append(score if previous is None else alpha * previous.to(score.dtype) + score)
    return store_saliency(graph, nodes, scores)


@dataclass(frozen=True)
class SnipMomentum(Pass):
    """SNIP with momentum for pruning during training: alpha·previous + beta·|w ⊙ g|."""

    name: ClassVar[str] = "snip-momentum"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    alpha: float = option(1.0, "weight of the previous score (INC's code: 0.9)")
    beta: float = option(0.9, "weight of this step's |w·g| (INC's code: 1.0)")
    source: Literal["data", "grad"] = option(
        "data", "gradient from `batches` of data, or the .grad left by the training loop"
    )
    batches: int = option(1, "batches of data to score on, with source=data")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring (source=data)")
    params: Literal["all", "prunable"] = option("all", PARAMS_DOC)

    def check(self) -> None:
        if self.batches < 1:
            raise OptionError(f"snip-momentum: batches={self.batches} must be at least 1")
        if self.alpha < 0 or self.beta <= 0:
            raise OptionError(
                f"snip-momentum: alpha={self.alpha}, beta={self.beta}; alpha must be >= 0 and "
                "beta > 0 (INC uses alpha=0.9, beta=1.0)"
            )

    accumulates: ClassVar[bool] = True

    def data_batches(self) -> int:
        return self.batches if self.source == "data" else 0

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = snip_momentum_saliency(
            graph, ctx.data, ctx.loss, alpha=self.alpha, beta=self.beta, source=self.source,
            batches=self.batches, bn=self.bn, params=self.params,
        )
        return PassResult(modified=False, info={"scored": len(scores)})
