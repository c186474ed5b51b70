"""``magnitude``: saliency |w| (of the effective, masked weight)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from chop.passes.analysis.common import effective_weight, scored_nodes, write_saliency

from chop.ir.graph import Graph
from chop.pipeline.pass_base import Context, Pass, PassResult


def magnitude_saliency(graph: Graph) -> dict[str, torch.Tensor]:
    """Write saliency |w| on every scored weight node; returns the scores by name."""
    nodes = scored_nodes(graph)
    return write_saliency(nodes, [effective_weight(graph, n).abs() for n in nodes])


@dataclass(frozen=True)
class Magnitude(Pass):
    """Magnitude criterion: saliency |w|; no data needed."""

    name: ClassVar[str] = "magnitude"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = magnitude_saliency(graph)
        return PassResult(modified=False, info={"scored": len(scores)})
