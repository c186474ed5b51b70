"""The base of the criterion passes: the analysis passes that write ``saliency``.

A criterion is a frozen dataclass with its own options as fields and one hook,
:meth:`Criterion.scores`, which returns a score tensor (the weight's shape) for each weight node
it is given. The base does the rest:

- the options every criterion has: ``params`` (which weights to score) and ``normalize``;
  :class:`DataCriterion` adds ``batches`` and ``bn`` for criteria that read data;
- the checks: every option named in ``counts`` must be at least 1 (``batches`` for data
  criteria), then the criterion's own :meth:`~chop.pipeline.pass_base.Pass.check` (call
  ``super().check()``);
- data and progress: inside the hook, ``ctx.data`` yields exactly the pass's
  :meth:`~chop.pipeline.pass_base.Pass.data_batches` batches (``take``: a missing or short data
  set is a :class:`~chop.errors.DataError`), wrapped in ``ctx.track`` for progress;
- storage: the scores become the ``saliency`` of the scored weight nodes, and every other weight
  node loses the saliency an earlier criterion left (``params=prunable`` leaves no stale scores);
- info: ``{"scored": number of scored weight tensors}``, the criterion's :meth:`Criterion.info`, and
  ``normalizer`` when ``normalize`` is on;
- the plain-function form, :meth:`Criterion.compute` (``snip_saliency = Snip.compute``).

A complete criterion::

    @dataclass(frozen=True)
    class AbsGradient(DataCriterion):
        \"\"\"Saliency |Σ_b ∂L_b/∂w|.\"\"\"

        name: ClassVar[str] = "abs-gradient"

        def scores(self, graph, nodes, ctx):
            return backward_sums(graph, nodes, ctx.data, ctx.loss, self.name, bn=self.bn,
                                 times_weight=False)

Add it to :data:`chop.pipeline.registry.PASSES` and it runs in pipelines, in the Pruner and from
the command line. The autograd scoring loop is :func:`~chop.passes.analysis.scoring.backward_sums`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from chop.errors import OptionError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import select_weights
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def scored_nodes(graph: Graph, params: str = "all") -> list[Node]:
    """The weight nodes a criterion scores.

    ``"all"`` (the default): every floating-point parameter, so the ``mask`` pass can select
    any of them (biases, norms, embeddings on request) without re-running the criterion.
    ``"prunable"``: only what ``mask`` selects by default (linear and conv weights), which
    saves the work and memory of scoring the rest (embedding tables can be most of a model).
    """
    nodes = select_weights(graph) if params == "prunable" else graph.weight_nodes()
    return [n for n in nodes if graph.parameter(n).is_floating_point()]


def effective_weight(graph: Graph, node: Node) -> torch.Tensor:
    """The weight as the graph computes with it: masked entries are zero."""
    weight = graph.parameter(node).detach()
    mask = meta.entries(node).get("mask")
    return weight * mask if mask is not None else weight


@dataclass(frozen=True)
class Criterion(Pass, ABC):
    """Base of the criterion passes; see the module doc."""

    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = ("saliency",)
    counts: ClassVar[tuple[str, ...]] = ()  # int options that must be at least 1

    params: Literal["all", "prunable"] = option(
        "all", "weights to score: all (every float parameter, so mask can also select "
        "biases/norms) or prunable (mask's default set: linear and conv weights; cheaper)"
    )
    normalize: bool = option(
        False, "divide scores by the sum of their absolute values (ranking unchanged; sum reported)"
    )

    def check(self) -> None:
        for key in self.counts:
            if getattr(self, key) < 1:
                raise OptionError(f"{self.name}: {key}={getattr(self, key)} must be at least 1")

    @abstractmethod
    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        """The score of each of ``nodes`` (a float tensor of the weight's shape), in order.
        ``ctx.data`` yields the pass's ``data_batches()`` batches (see the module doc)."""

    def info(self, graph: Graph, nodes: list[Node], scores: list[torch.Tensor]) -> dict[str, Any]:
        """Facts for the pass's info beyond ``scored``; runs before the scores are stored, so
        the graph still holds the saliency of the criterion before."""
        return {}

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        return PassResult(modified=False, info=self._score(graph, ctx)[1])

    @classmethod
    def compute(
        cls,
        graph: Graph,
        data: Iterable | None = None,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        *,
        track: Callable[[Iterable, int | None, str], Iterable] | None = None,
        **options: Any,
    ) -> dict[str, torch.Tensor]:
        """Build the criterion from ``options``, write its saliency on ``graph`` and return the
        scores by parameter name: the plain-function form of the pass."""
        ctx = Context(data=data, loss=loss)
        if track is not None:
            ctx.track = track
        return cls.from_options(options)._score(graph, ctx)[0]

    def _score(self, graph: Graph, ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        nodes = scored_nodes(graph, self.params)
        data, count = ctx.data, self.data_batches()
        if count:  # in place, not a copy: a node the hook marks (ctx.visiting) is reported
            ctx.data = ctx.track(take(data, count, self.name), count, self.name)
        try:
            scores = self.scores(graph, nodes, ctx)
        finally:
            ctx.data = data
        info = {"scored": len(nodes), **self.info(graph, nodes, scores)}
        if self.normalize:
            info["normalizer"] = total = float(sum(s.double().abs().sum() for s in scores))
            scores = [s / total for s in scores] if total else scores
        chosen = set(nodes)
        for node in graph.weight_nodes():
            if node not in chosen:
                node.meta.get("chop", {}).pop("saliency", None)
        for node, score in zip(nodes, scores, strict=True):
            meta.entries(node)["saliency"] = score
        return {node.target: score for node, score in zip(nodes, scores)}, info


@dataclass(frozen=True)
class DataCriterion(Criterion):
    """Base of the criteria computed from batches of data (with a loss)."""

    counts: ClassVar[tuple[str, ...]] = ("batches",)

    batches: int = option(1, "batches of data to score on")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")

    def data_batches(self) -> int:
        return self.batches
