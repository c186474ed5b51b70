"""``exact-salience``: the loss change of removing each weight, |L(w) − L(w_j = 0)|, measured.

What SNIP (first order) and ``snip2`` (second order) approximate, computed by brute force: one
forward per weight, batched ``chunk`` ablations at a time with ``torch.func.vmap`` over the graph
evaluated on substituted weights (``torch.func.functional_call``), so the graph's own tensors are
never touched. Over several batches the loss is summed before the absolute value, as in snip's
``abs-of-sum``; with a process group (``distributed=auto``) the sums of all the ranks' batches
are added up before it. Weights that are already zero (masked) score exactly 0.

For small models and for validating the approximations: when the graph already carries saliency
from another criterion (``snip, exact-salience``), the pass reports the Spearman rank correlation
between it and the exact salience (``spearman``, ``compared_with`` in its info). Models with more
than ``max_weights`` scored weights are refused. Computes in float64 by default (``dtype``), so
that small loss changes are not rounding noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from chop.errors import OptionError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.passes.analysis.criterion import DataCriterion, effective_weight
from chop.passes.analysis.functional import (
    cast_inputs,
    dtype_hint,
    functional_forward,
    functional_state,
)
from chop.passes.analysis.ranks import spearman
from chop.passes.analysis.scoring import batch_losses
from chop.pipeline import registry
from chop.pipeline.pass_base import Context, option


@dataclass(frozen=True)
class ExactSalience(DataCriterion):
    """Exact loss change |L(w) − L(w_j=0)| per weight by batched ablation (small models)."""

    name: ClassVar[str] = "exact-salience"
    counts: ClassVar[tuple[str, ...]] = ("batches", "chunk", "max_weights")

    dtype: Literal["float64", "model"] = option(
        "float64", "compute in float64, or in the model's own dtype"
    )
    chunk: int = option(256, "ablations evaluated per vmapped forward")
    max_weights: int = option(100_000, "refuse models with more scored weights than this")

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        count = sum(graph.parameter(n).numel() for n in nodes)
        if count > self.max_weights:
            raise OptionError(
                f"exact-salience runs one forward per weight, and {graph.name} has {count} scored "
                f"weights, above max_weights={self.max_weights}; raise max_weights if that is "
                "affordable, score fewer weights (params=prunable), or use snip2 (second-order "
                "approximation)"
            )
        cast = torch.float64 if self.dtype == "float64" else None
        chosen = [cast_inputs(batch, cast) for batch in ctx.data]
        weights, buffers = functional_state(graph, cast)
        train = self.bn == "train"  # BatchNorm updates running statistics: one copy per ablation

        def losses(state: dict[str, torch.Tensor]) -> torch.Tensor:
            forward = functional_forward(graph, state)
            return torch.stack(list(batch_losses(forward, chosen, ctx.loss, self.name)))

        def ablated(weight: torch.Tensor, own: dict[str, torch.Tensor], name: str) -> torch.Tensor:
            return losses({**weights, **own, name: weight})

        scores = []
        with graph.mode(batch_norm=train, dropout=False), torch.no_grad(), \
                dtype_hint(self.name, cast):
            # a rank given no batch (shared data over more ranks than batches) adds zeros
            base = losses({**weights, **{k: v.clone() for k, v in buffers.items()}}
                          ) if chosen else None
            for node in ctx.track(nodes, len(nodes), self.name):
                name = node.target
                flat = weights[name].reshape(-1)
                n = flat.numel()
                delta = torch.zeros(n, dtype=torch.float64)
                for start in range(0, n if chosen else 0, self.chunk):
                    index = torch.arange(start, min(start + self.chunk, n))
                    rows = len(index)
                    batch = flat.expand(rows, n).clone()
                    batch[torch.arange(rows), index] = 0
                    batch = batch.view(rows, *weights[name].shape)
                    if train:
                        own = {k: v.expand(rows, *v.shape).clone() for k, v in buffers.items()}
                        dims: tuple = (0, 0, None)
                    else:
                        own, dims = buffers, (0, None, None)
                    out = torch.func.vmap(ablated, in_dims=dims)(batch, own, name)
                    delta[index] = (base - out).sum(1).double().cpu()
                self.sum_over_ranks([delta])
                score = delta.abs().view(weights[name].shape)
                zero = (effective_weight(graph, node) == 0).cpu()
                score[zero] = 0.0  # removing a zero weight changes nothing: no rounding noise
                scores.append(score.to(graph.parameter(node).device))
        return scores

    def info(self, graph: Graph, nodes: list[Node], scores: list[torch.Tensor]) -> dict[str, Any]:
        """The Spearman correlation with the saliency an earlier criterion left, if any."""
        before = [meta.entries(n).get("saliency") for n in nodes]
        if any(s is None for s in before):
            return {}
        return {"spearman": spearman(before, scores), "compared_with": _source(graph)}


def _source(graph: Graph) -> str:
    """The name of the last pass in ``graph.history`` that provides saliency (or "unknown")."""
    for record in reversed(graph.history):
        if record.name in registry.PASSES and "saliency" in registry.get(record.name).provides:
            return record.name
    return "unknown"


exact_salience = ExactSalience.compute
