"""``snip``: connection sensitivity (Lee et al., ICLR 2019).

The saliency of weight w is |∂L/∂m| at m = 1 for the masked weight w·m, which equals |g ⊙ w|
with g = ∂L/∂w. Over several batches the default is |Σ_b g_b ⊙ w| (``abs-of-sum``, as SynFlow
and FORCE compute it: the gradient of the summed loss); ``sum-of-abs`` gives Σ_b |g_b ⊙ w|
(Mikler's reproduction). One forward and one backward per batch, on the graph itself (no copy).
Scoring leaves parameters, buffers, ``requires_grad`` flags and ``.grad`` bit-identical. On a
masked graph g is zero where the mask is, so pruned weights score 0 (iterative SNIP relies on
this).

Which weights are scored (``params``): every floating parameter by default, so that ``mask`` can
also select biases and norm weights (``mask{biases=true, norms=true}``) without re-scoring; the
extra cost is one multiply per bias/norm entry. ``params=prunable`` scores only what ``mask``
selects by default (linear and conv weights), which saves the memory of large embedding tables;
``mask`` then refuses to select the unscored weights.

``normalize`` (an option of every criterion) divides every score by Σ score over all scored
weights (the ranking, and so the mask, is unchanged); the sum is reported as ``normalizer`` in
the pass's info (and so in ``graph.history`` and the report).

With a ``torch.distributed`` process group each rank scores its own ``batches`` batches and the
sums are added up over the ranks (``distributed=auto``, see
:func:`~chop.passes.analysis.scoring.backward_sums`): every rank gets the saliency of all the
ranks' batches together, so ``mask`` makes the same masks on every rank. A sharded model
(FSDP2, tensor parallel) is scored eagerly on its local shards (``chop.Pruner``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.fx import Node

from chop.ir.graph import Graph
from chop.passes.analysis.criterion import DataCriterion
from chop.passes.analysis.scoring import backward_sums, module_backward_sums
from chop.pipeline.pass_base import Context, option


@dataclass(frozen=True)
class Snip(DataCriterion):
    """SNIP connection sensitivity |g ⊙ w| from `batches` batches of data."""

    name: ClassVar[str] = "snip"
    times_weight: ClassVar[bool] = True  # |g ⊙ w|; gradient's |g| is this loop without it

    accumulate: Literal["abs-of-sum", "sum-of-abs"] = option(
        "abs-of-sum", "over batches: |Σ g·w| (SynFlow/FORCE) or Σ |g·w| (Mikler)"
    )

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        return backward_sums(graph, nodes, ctx.data, ctx.loss, self.name, bn=self.bn,
                             accumulate=self.accumulate, times_weight=self.times_weight,
                             over_ranks=self.data_parallel())

    def module_scores(self, module: nn.Module, params: list[nn.Parameter], ctx: Context,
                      previous: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return module_backward_sums(module, params, ctx.data, ctx.loss, self.name, bn=self.bn,
                                    accumulate=self.accumulate, times_weight=self.times_weight)


snip_saliency = Snip.compute
