"""``gradient``: saliency |g| with g = ∂L/∂w (Intel Neural Compressor's ``gradient`` criterion).

Unlike SNIP it ignores the weight's magnitude: it keeps the weights the loss is most sensitive
to per unit change. Over several batches |Σ_b g_b| by default, Σ_b |g_b| as an option, like
``snip``. The model is left bit-identical.
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

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def gradient_saliency(
    graph: Graph,
    data: Iterable,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    batches: int = 1,
    bn: str = "eval",
    accumulate: str = "abs-of-sum",
    params: Params = "all",
) -> dict[str, torch.Tensor]:
    """Write saliency |g| on the scored weight nodes; returns the scores by name."""
    nodes = scored_nodes(graph, params)
    sums = accumulated_gradients(
        graph, nodes, take(data, batches, "gradient"), loss,
        bn=bn, accumulate=accumulate, times_weight=False, who="gradient",
    )
    return store_saliency(graph, nodes, sums)


@dataclass(frozen=True)
class Gradient(Pass):
    """Gradient criterion: saliency |∂L/∂w| from `batches` batches of data."""

    name: ClassVar[str] = "gradient"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    batches: int = option(1, "batches of data to score on (one forward+backward each)")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    accumulate: Literal["abs-of-sum", "sum-of-abs"] = option(
        "abs-of-sum", "over batches: |Σ g| or Σ |g|"
    )
    params: Literal["all", "prunable"] = option("all", PARAMS_DOC)

    def check(self) -> None:
        if self.batches < 1:
            raise OptionError(f"gradient: batches={self.batches} must be at least 1")

    def data_batches(self) -> int:
        return self.batches

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = gradient_saliency(
            graph, ctx.data, ctx.loss, batches=self.batches, bn=self.bn,
            accumulate=self.accumulate, params=self.params,
        )
        return PassResult(modified=False, info={"scored": len(scores)})
