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
- the plain-function form, :meth:`Criterion.compute` (``snip_saliency = Snip.compute``);
- data parallelism (:class:`DataCriterion`'s ``distributed``): with a ``torch.distributed``
  process group, each rank scores its own batches and the criterion sums what they accumulate
  over the ranks before its final step (``backward_sums(..., over_ranks=...)``,
  :meth:`DataCriterion.sum_over_ranks`), so every rank stores the same saliency; the info then
  has ``ranks``;
- sharded models: :meth:`Criterion.score_module` scores the local shards of an eager module
  whose parameters are DTensors (FSDP2, tensor parallel), which cannot be traced; criteria that
  can override :meth:`Criterion.module_scores`.

A complete criterion::

    @dataclass(frozen=True)
    class AbsGradient(DataCriterion):
        \"\"\"Saliency |Σ_b ∂L_b/∂w|.\"\"\"

        name: ClassVar[str] = "abs-gradient"

        def scores(self, graph, nodes, ctx):
            return backward_sums(graph, nodes, ctx.data, ctx.loss, self.name, bn=self.bn,
                                 times_weight=False, over_ranks=self.data_parallel())

Add it to :data:`chop.pipeline.registry.PASSES` and it runs in pipelines, in the Pruner and from
the command line. The autograd scoring loop is :func:`~chop.passes.analysis.scoring.backward_sums`.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.fx import Node

from chop.errors import OptionError, PassError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import masked, select_weights
from chop.kernels import distributed as dist
from chop.pipeline import registry
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Context, Pass, PassResult, option


def scored_nodes(graph: Graph, params: str = "all") -> list[Node]:
    """The weight nodes a criterion scores.

    ``"all"`` (the default): every floating-point parameter, so the ``mask`` pass can select
    any of them (biases, norms, embeddings on request) without re-running the criterion.
    ``"prunable"``: only what ``mask`` selects by default (linear and conv weights), which
    saves the work and memory of scoring the rest (embedding tables can be most of a model).
    """
    key = ("scored nodes", params)
    memo = graph.memo()  # held while the graph's structure does (a Pruner scores every step)
    if key not in memo:
        nodes = select_weights(graph) if params == "prunable" else graph.weight_nodes()
        memo[key] = [n for n in nodes if graph.parameter(n).dtype.is_floating_point]
    return list(memo[key])


def _unscored(graph: Graph, params: str) -> list[Node]:
    """The weight nodes :func:`scored_nodes` leaves out (remembered like them)."""
    key = ("unscored nodes", params)
    memo = graph.memo()
    if key not in memo:
        chosen = set(scored_nodes(graph, params))
        memo[key] = [n for n in graph.weight_nodes() if n not in chosen]
    return memo[key]


def reusable(previous: list[torch.Tensor | None], new: list[torch.Tensor]) -> bool:
    """Whether :meth:`Criterion.module_scores` can write scores like ``new`` into ``previous``
    (given up by its caller): each is there, of the same shape, dtype and device. A Pruner
    that scores at every step then writes into the same memory each time, where fresh
    tensors as large as an embedding (tens of MB) would be mapped and zeroed anew."""
    return all(old is not None and old.shape == now.shape and old.dtype == now.dtype
               and old.device == now.device for old, now in zip(previous, new, strict=True))


def effective_weight(graph: Graph, node: Node) -> torch.Tensor:
    """The weight as the graph computes with it: masked entries are zero. A masked weight's is
    a new tensor (the caller may edit it in place), an unmasked one's the parameter's memory."""
    weight = graph.parameter(node).detach()
    mask = meta.entries(node).get("mask")
    return masked(weight, mask) if mask is not None else weight


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
        False, "divide scores by the sum of their absolute values (ranking unchanged; sum "
               "reported; float16/bfloat16 scores become float32)"
    )

    def check(self) -> None:
        for key in self.counts:
            if getattr(self, key) < 1:
                raise OptionError(f"{self.name}: {key}={getattr(self, key)} must be at least 1")

    @abstractmethod
    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        """The score of each of ``nodes`` (a float tensor of the weight's shape), in order.
        ``ctx.data`` yields the pass's ``data_batches()`` batches (see the module doc)."""

    def module_scores(
        self, module: nn.Module, params: list[nn.Parameter], ctx: Context,
        previous: list[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """The score of each parameter's local shard (``to_local()`` of a DTensor, a plain
        tensor whole), computed eagerly on ``module``, for models whose parameters are sharded
        (FSDP2, tensor parallel), or of a plain module a Pruner scores at every step.
        ``previous``: the scores the parameters had (None: none), for accumulating criteria;
        the caller gives them up, so a criterion may write its new scores into them (where
        :func:`reusable`) rather than into fresh memory. The default refuses: override it
        where the criterion can."""
        able = [name for name, cls in registry.all_passes().items()
                if issubclass(cls, Criterion) and cls.module_scores is not Criterion.module_scores]
        raise OptionError(
            f"{self.name} cannot score a sharded model (DTensor parameters from fully_shard or "
            f"a tensor-parallel plan), which is scored on the module itself; use one of: "
            f"{', '.join(able)}"
        )

    def score_module(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        data: Iterable | None = None,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        previous: list[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`module_scores` with this pass's batches of ``data``: the local-shard scores
        of ``params`` of an eager (sharded) module. ``previous`` is given up (its tensors may
        be overwritten with the new scores)."""
        if self.normalize:
            raise OptionError(
                f"{self.name}: normalize=true is not supported on sharded models; drop it (it "
                "does not change the mask)"
            )
        ctx = Context(data=data, loss=loss)
        count = self.data_batches()
        if count:
            ctx.data = ctx.track(take(data, count, self.name), count, self.name)
        return self.module_scores(module, params, ctx, previous or [None] * len(params))

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
        shared_data: bool = False,
        **options: Any,
    ) -> dict[str, torch.Tensor]:
        """Build the criterion from ``options``, write its saliency on ``graph`` and return the
        scores by parameter name: the plain-function form of the pass (``track`` and
        ``shared_data`` as in :class:`~chop.pipeline.pass_base.Context`)."""
        ctx = Context(data=data, loss=loss, shared_data=shared_data)
        if track is not None:
            ctx.track = track
        return cls.from_options(options)._score(graph, ctx)[0]

    def _batches(self, data: Iterable | None, count: int, shared: bool) -> tuple[Iterable, int]:
        """The batches the hook reads, and how many: the first ``count`` of ``data``."""
        return take(data, count, self.name), count

    def _score(self, graph: Graph, ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        nodes = scored_nodes(graph, self.params)
        if not nodes:
            prunable = self.params == "prunable"
            raise PassError(
                f"{self.name}: {graph.name} has no weights to score with params={self.params} "
                f"({'linear and conv weights' if prunable else 'floating-point parameters'}); "
                + ("use params=all to score the other parameters" if prunable
                   else "prune a model that has parameters")
            )
        data, count = ctx.data, self.data_batches()
        if count:  # in place, not a copy: a node the hook marks (ctx.visiting) is reported
            ctx.data = ctx.track(*self._batches(data, count, ctx.shared_data), self.name)
        try:
            scores = self.scores(graph, nodes, ctx)
        finally:
            ctx.data = data
        info = {"scored": len(nodes), **self.info(graph, nodes, scores)}
        if self.normalize:
            info["normalizer"] = total = float(sum(s.double().abs().sum() for s in scores))
            # half-precision scores divided in float32: in float16 they underflowed and tied
            scores = [(s.float() if s.dtype in _HALF else s) / total for s in scores] if total \
                else scores
        for node in _unscored(graph, self.params):
            node.meta.get("chop", {}).pop("saliency", None)
        for node, score in zip(nodes, scores, strict=True):
            meta.entries(node)["saliency"] = score
        return {node.target: score for node, score in zip(nodes, scores)}, info


_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DataCriterion(Criterion):
    """Base of the criteria computed from batches of data (with a loss)."""

    counts: ClassVar[tuple[str, ...]] = ("batches",)

    batches: int = option(1, "batches of data to score on (with a process group: per rank)")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    distributed: Literal["auto", "off"] = option(
        "auto", "with a torch.distributed process group (auto), sum over the ranks, so each "
        "rank scores all ranks' batches and masks alike; off: this rank's batches only"
    )

    def data_batches(self) -> int:
        return self.batches

    def data_parallel(self) -> bool:
        """Whether the scores are summed over the ranks of a process group."""
        return self.distributed == "auto" and dist.active()

    def _batches(self, data: Iterable | None, count: int, shared: bool) -> tuple[Iterable, int]:
        """With data shared by every rank, this rank's share of the first ``count`` batches
        (batch i on rank i mod world size); else the first ``count`` of this rank's own."""
        if not (shared and self.data_parallel()):
            return super()._batches(data, count, shared)
        rank, world = dist.rank(), dist.world_size()
        mine = len(range(rank, count, world))
        return itertools.islice(take(data, count, self.name), rank, None, world), mine

    def sum_over_ranks(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks in place when :meth:`data_parallel` (every rank must
        pass the same shapes in the same order)."""
        if self.data_parallel():
            dist.sum_over_ranks(tensors, what=f"{self.name}: summing the scores over the ranks",
                                agree=str(self))

    def _score(self, graph: Graph, ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        scores, info = super()._score(graph, ctx)
        if self.data_parallel():
            info["ranks"] = dist.world_size()
        return scores, info
