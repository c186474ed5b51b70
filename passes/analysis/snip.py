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

``normalize`` divides every score by Σ score over all scored weights (the ranking, and so the
mask, is unchanged); the sum is reported as ``normalizer`` in the pass's info (and so in
``graph.history`` and the report).
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
    normalize_saliency,
    scored_nodes,
    store_saliency,
)

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def snip_saliency(
    graph: Graph,
    data: Iterable,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    batches: int = 1,
    bn: str = "eval",
    accumulate: str = "abs-of-sum",
    params: Params = "all",
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
) -> dict[str, torch.Tensor]:
    """Write SNIP saliency on the scored weight nodes; returns the scores by name."""
    nodes = scored_nodes(graph, params)
    batches_iter = take(data, batches, "snip")
    if track is not None:
        batches_iter = track(batches_iter, batches, "snip")
    sums = accumulated_gradients(
        graph, nodes, batches_iter, loss, bn=bn, accumulate=accumulate, who="snip"
    )
    return store_saliency(graph, nodes, sums)


@dataclass(frozen=True)
class Snip(Pass):
    """SNIP connection sensitivity |g ⊙ w| from `batches` batches of data."""

    name: ClassVar[str] = "snip"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    batches: int = option(1, "batches of data to score on (one forward+backward each)")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    accumulate: Literal["abs-of-sum", "sum-of-abs"] = option(
        "abs-of-sum", "over batches: |Σ g·w| (SynFlow/FORCE) or Σ |g·w| (Mikler)"
    )
    params: Literal["all", "prunable"] = option("all", PARAMS_DOC)
    normalize: bool = option(False, "divide scores by their sum (ranking unchanged; sum reported)")

    def check(self) -> None:
        if self.batches < 1:
            raise OptionError(f"snip: batches={self.batches} must be at least 1")

    def data_batches(self) -> int:
        return self.batches

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = snip_saliency(
            graph, ctx.data, ctx.loss, batches=self.batches, bn=self.bn,
            accumulate=self.accumulate, params=self.params, track=ctx.track,
        )
        info: dict[str, Any] = {"scored": len(scores)}
        if self.normalize:
            info["normalizer"] = normalize_saliency(scored_nodes(graph, self.params))
        return PassResult(modified=False, info=info)
