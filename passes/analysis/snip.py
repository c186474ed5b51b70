"""``snip``: connection sensitivity (Lee et al., ICLR 2019).

The saliency of weight w is |∂L/∂m| at m = 1 for the masked weight w·m, which equals |g ⊙ w|
with g = ∂L/∂w. Over several batches the default is |Σ_b g_b ⊙ w| (``abs-of-sum``, as SynFlow
and FORCE compute it: the gradient of the summed loss); ``sum-of-abs`` gives Σ_b |g_b ⊙ w|
(Mikler's reproduction). One forward and one backward per batch, on the graph itself (no copy).
Scoring leaves parameters, buffers and ``requires_grad`` flags bit-identical. On a masked graph
g is zero where the mask is, so pruned weights score 0 (iterative SNIP relies on this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from chop.data import call, cross_entropy, take
from chop.errors import DataError, OptionError
from chop.graph import Graph
from chop.pass_base import Context, Pass, PassResult, option
from passes.analysis.common import scored_nodes, write_saliency


def snip_saliency(
    graph: Graph,
    data: Iterable,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    batches: int = 1,
    bn: str = "eval",
    accumulate: str = "abs-of-sum",
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
) -> dict[str, torch.Tensor]:
    """Write SNIP saliency on every floating-point weight node; returns the scores by name."""
    loss = loss or cross_entropy
    nodes = scored_nodes(graph)
    params = [graph.parameter(n) for n in nodes]
    flags = [p.requires_grad for p in params]
    saved = [(b, b.clone()) for b in graph.module.buffers()]
    sums = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
    batches_iter = take(data, batches, "snip")
    if track is not None:
        batches_iter = track(batches_iter, batches, "snip")
    try:
        for p in params:
            p.requires_grad_(True)
        with graph.mode(batch_norm=bn == "train", dropout=False):
            for inputs, targets in batches_iter:
                value = loss(call(graph.module, inputs), targets)
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise DataError(
                        f"snip: the loss must return a scalar tensor, got "
                        f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}"
                    )
                grads = torch.autograd.grad(value, params, allow_unused=True)
                with torch.no_grad():
                    for total, grad, p in zip(sums, grads, params):
                        if grad is None:
                            continue
                        if accumulate == "abs-of-sum":
                            total.add_(grad)
                        else:
                            total.add_((grad * p).abs_())
    finally:
        with torch.no_grad():
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for buffer, copy in saved:
                buffer.copy_(copy)
    if accumulate == "abs-of-sum":
        with torch.no_grad():
            sums = [total.mul_(p).abs_() for total, p in zip(sums, params)]
    return write_saliency(nodes, sums)


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

    def check(self) -> None:
        if self.batches < 1:
            raise OptionError(f"snip: batches={self.batches} must be at least 1")

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        scores = snip_saliency(
            graph, ctx.data, ctx.loss,
            batches=self.batches, bn=self.bn, accumulate=self.accumulate, track=ctx.track,
        )
        return PassResult(modified=False, info={"scored": len(scores)})
