"""``random``: uniform random saliency, the baseline every criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from chop.passes.analysis.common import scored_nodes, write_saliency

from chop.ir import meta
from chop.ir.graph import Graph
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def random_saliency(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write uniform [0, 1) saliency (0 where already masked), reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    nodes = scored_nodes(graph)
    scores = []
    for node in nodes:
        score = torch.rand(graph.parameter(node).shape, generator=generator)
        mask = meta.entries(node).get("mask")
        scores.append(score if mask is None else score * mask)
    return write_saliency(nodes, scores)


@dataclass(frozen=True)
class Random(Pass):
    """Random criterion: uniform scores, so `mask` keeps a uniformly random subset."""

    name: ClassVar[str] = "random"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    seed: int = option(0, "seed of the random generator; the same seed gives the same scores")

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = random_saliency(graph, self.seed)
        return PassResult(modified=False, info={"scored": len(scores)})
