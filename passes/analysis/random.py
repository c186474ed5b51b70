"""``random``: uniform random saliency in [0, 1), the baseline every criterion must beat.

Weights already masked score 0; the same ``seed`` gives the same scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import Node

from chop.ir import meta
from chop.ir.graph import Graph
from chop.passes.analysis.criterion import Criterion
from chop.pipeline.pass_base import Context, option


@dataclass(frozen=True)
class Random(Criterion):
    """Random criterion: uniform scores, so `mask` keeps a uniformly random subset."""

    name: ClassVar[str] = "random"

    seed: int = option(0, "seed of the random generator; the same seed gives the same scores")

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        scores = []
        for node in nodes:
            score = torch.rand(graph.parameter(node).shape, generator=generator)
            mask = meta.entries(node).get("mask")
            scores.append(score if mask is None else score * mask)
        return scores


random_saliency = Random.compute
