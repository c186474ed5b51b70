"""``magnitude``: saliency |w| (of the effective, masked weight); no data needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.fx import Node

from chop.ir import meta
from chop.ir.graph import Graph
from chop.kernels.distributed import local
from chop.passes.analysis.criterion import Criterion, effective_weight, reusable
from chop.pipeline.pass_base import Context


@dataclass(frozen=True)
class Magnitude(Criterion):
    """Magnitude criterion: saliency |w|; no data needed."""

    name: ClassVar[str] = "magnitude"

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        weights = [(effective_weight(graph, n), "mask" in meta.entries(n)) for n in nodes]
        return [w.abs_() if fresh else w.abs() for w, fresh in weights]  # abs_: no second copy

    def module_scores(self, module: nn.Module, params: list[nn.Parameter], ctx: Context,
                      previous: list[torch.Tensor | None]) -> list[torch.Tensor]:
        weights = [local(p).detach() for p in params]  # masked: zero in place
        if reusable(previous, weights):  # a Pruner's scores of the step before
            for weight, old in zip(weights, previous):
                torch.abs(weight, out=old)
            return previous
        return torch._foreach_abs(weights)


magnitude_saliency = Magnitude.compute
