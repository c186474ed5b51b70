"""``exact-salience``: the loss change of removing each weight, |L(w) − L(w_j = 0)|, measured.

What SNIP (first order) and ``snip2`` (second order) approximate, computed by brute force: one
forward per weight, batched ``chunk`` ablations at a time with ``torch.func.vmap`` over the graph
evaluated on substituted weights (``torch.func.functional_call``), so the graph's own tensors are
never touched. Over several batches the loss is summed before the absolute value, as in snip's
``abs-of-sum``. Weights that are already zero (masked) score exactly 0.

For small models and for validating the approximations: when the graph already carries saliency
from another criterion (``snip, exact-salience``), the pass reports the Spearman rank correlation
between it and the exact salience (``spearman``, ``compared_with`` in its info). Models with more
than ``max_weights`` scored weights are refused. Computes in float64 by default (``dtype``), so
that small loss changes are not rounding noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from chop.passes.analysis.common import (
    PARAMS_DOC,
    Params,
    batch_losses,
    cast_inputs,
    dtype_hint,
    effective_weight,
    functional_forward,
    functional_state,
    previous_saliency,
    saliency_source,
    scored_nodes,
    spearman,
    store_saliency,
)

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def exact_salience(
    graph: Graph,
    data: Iterable,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    batches: int = 1,
    bn: str = "eval",
    dtype: str = "float64",
    chunk: int = 256,
    max_weights: int = 100_000,
    params: Params = "all",
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
) -> dict[str, torch.Tensor]:
    """Write saliency |Σ_b L_b(w) − L_b(w_j = 0)| on the scored weight nodes."""
    nodes = scored_nodes(graph, params)
    count = sum(graph.parameter(n).numel() for n in nodes)
    if count > max_weights:
        raise OptionError(
            f"exact-salience runs one forward per weight, and {graph.name} has {count} scored "
            f"weights, above max_weights={max_weights}; raise max_weights if that is affordable, "
            "score fewer weights (params=prunable), or use snip2 (second-order approximation)"
        )
    cast = torch.float64 if dtype == "float64" else None
    chosen = [cast_inputs(batch, cast) for batch in take(data, batches, "exact-salience")]
    weights, buffers = functional_state(graph, cast)
    train = bn == "train"  # BatchNorm then updates running statistics: give each ablation its own

    def losses(state: dict[str, torch.Tensor]) -> torch.Tensor:
        forward = functional_forward(graph, state)
        return torch.stack(list(batch_losses(forward, chosen, loss, "exact-salience")))

    def ablated(weight: torch.Tensor, own: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return losses({**weights, **own, name: weight})

    scores = []
    with graph.mode(batch_norm=train, dropout=False), torch.no_grad(), \
            dtype_hint("exact-salience", cast):
        base = losses({**weights, **{k: v.clone() for k, v in buffers.items()}})
        todo = nodes if track is None else track(nodes, len(nodes), "exact-salience")
        for node in todo:
            name = node.target
            flat = weights[name].reshape(-1)
            n = flat.numel()
            delta = torch.zeros(n, dtype=torch.float64)
            for start in range(0, n, chunk):
                index = torch.arange(start, min(start + chunk, n))
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
            score = delta.abs().view(weights[name].shape)
            zero = (effective_weight(graph, node) == 0).cpu()
            score[zero] = 0.0  # removing a zero weight changes nothing: no rounding noise
            scores.append(score.to(graph.parameter(node).device))
    return store_saliency(graph, nodes, scores)


@dataclass(frozen=True)
class ExactSalience(Pass):
    """Exact loss change |L(w) − L(w_j=0)| per weight by batched ablation (small models)."""

    name: ClassVar[str] = "exact-salience"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)

    batches: int = option(1, "batches of data the loss is summed over")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    dtype: Literal["float64", "model"] = option(
        "float64", "compute in float64, or in the model's own dtype"
    )
    chunk: int = option(256, "ablations evaluated per vmapped forward")
    max_weights: int = option(100_000, "refuse models with more scored weights than this")
    params: Literal["all", "prunable"] = option("all", PARAMS_DOC)

    def check(self) -> None:
        for key in ("batches", "chunk", "max_weights"):
            if getattr(self, key) < 1:
                raise OptionError(f"exact-salience: {key}={getattr(self, key)} must be at least 1")

    def data_batches(self) -> int:
        return self.batches

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        nodes = scored_nodes(graph, self.params)
        before, source = previous_saliency(nodes), saliency_source(graph)
        scores = exact_salience(
            graph, ctx.data, ctx.loss, batches=self.batches, bn=self.bn, dtype=self.dtype,
            chunk=self.chunk, max_weights=self.max_weights, params=self.params, track=ctx.track,
        )
        info: dict[str, Any] = {"scored": len(scores)}
        if before is not None:
            info["spearman"] = spearman(before, [scores[n.target] for n in nodes])
            info["compared_with"] = source
        return PassResult(modified=False, info=info)
