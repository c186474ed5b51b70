"""``iterative-snip``: prune before training in ``steps`` rounds of SNIP (SNIP-it / FORCE).

Round t = 1..T keeps the fraction keep^(t/T) of the selected weights (keep = 1 − sparsity), so
the last round keeps exactly round(keep·N), as ``mask`` counts it. Each round re-scores the
*masked* network with :func:`~chop.passes.analysis.snip.snip_saliency` and re-masks with the
``mask`` pass (same selection options: ``sparsity``, ``scope``, ``include``/``exclude``…).

- Without ``allow_regrowth`` (SNIP-it, Verdenius et al. 2020): on a masked graph the gradient of a
  pruned weight is zero, so its saliency is 0; pruned weights are moreover ranked below every
  kept one while selecting (:func:`pruned_last`), so a tie at 0 (dead units) cannot bring one
  back. Each round's mask is a subset of the previous one.
- With ``allow_regrowth`` (FORCE, de Jorge et al. 2021): the saliency is |θ ⊙ ∂L/∂(θ ⊙ c)|, the
  gradient with respect to the *masked* weight times the *original* weight, so a pruned weight
  whose connection would lower the loss scores > 0 and may return. snip differentiates with
  respect to θ, which on ``θ ⊙ c`` gives ``c ⊙ ∂L/∂(θ ⊙ c)``; :func:`straight_through` therefore
  computes each masked weight as ``θ − stop_grad(θ ⊙ ¬c)`` while scoring — the same values, but
  ∂/∂θ = ∂L/∂(θ ⊙ c) — so snip's |g ⊙ θ| is exactly FORCE's saliency.

The graph's existing masks (from an earlier ``mask``) are the starting point; without
``allow_regrowth``, masks that already prune more than round 1 would are refused (a round
cannot keep weights they pruned). Every round scores
on the same first ``batches`` batches (``chop.run`` reads a one-pass iterator once).
With a ``torch.distributed`` process group (``distributed=auto``) each round's scores are summed
over the ranks' batches (as ``snip`` does), so every rank makes the same masks in every round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from chop.errors import OptionError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import mask_nodes, mask_of, select_weights
from chop.kernels.reduce import is_float8
from chop.kernels.select import kept_count
from chop.passes.analysis.snip import snip_saliency
from chop.passes.transform.mask import Mask
from chop.pipeline.pass_base import Context, PassResult, option


def step_sparsity(sparsity: float, step: int, steps: int) -> float:
    """Sparsity after round ``step`` of ``steps``: 1 − keep^(step/steps), exactly ``sparsity``
    at the last round."""
    return sparsity if step >= steps else 1.0 - (1.0 - sparsity) ** (step / steps)


def below_kept(score: torch.Tensor, mask: torch.Tensor, floor: float = -math.inf
               ) -> torch.Tensor:
    """``score`` with its masked-out entries (``mask`` False) at ``floor``: by default −∞,
    below every kept entry's score, negative ones included (GraSP's are); float8 scores come
    back as float32, which holds them exactly and has −∞."""
    return torch.where(mask, score.float() if is_float8(score) else score, floor)


@contextmanager
def pruned_last(graph: Graph, granularity: str = "element") -> Iterator[None]:
    """While inside, the saliency of every masked-out weight reads −∞ (:func:`below_kept`), so
    a selection never prefers a pruned weight to a kept one; the true scores are restored on
    exit. For channel and head granularity, where a unit's score sums its members' (a kept
    channel's members include entries of rows another layer pruned), a pruned entry reads −1
    instead: −∞ would make those kept units' sums −∞ as well, and tie them with pruned ones
    (a score below −1, as GraSP's can be, may then still rank a kept unit under a pruned one)."""
    floor = -1.0 if granularity in ("channel", "head") else -math.inf
    saved = []
    for node in graph.weight_nodes():
        entry = meta.entries(node)
        score, mask = entry.get("saliency"), entry.get("mask")
        if score is not None and mask is not None:
            saved.append((entry, score))
            entry["saliency"] = below_kept(score, mask, floor)
    try:
        yield
    finally:
        for entry, score in saved:
            entry["saliency"] = score


@contextmanager
def straight_through(graph: Graph) -> Iterator[None]:
    """While inside, every ``mul(θ, c)`` mask node computes ``θ − (θ ⊙ ¬c)`` with the second
    term a constant buffer: the same value, but the gradient with respect to θ is the gradient
    with respect to the masked weight (see the module doc). Restored on exit."""
    changed = []
    module = graph.module
    try:
        for mul in list(mask_nodes(graph)):
            name = mask_of(mul)
            weight_node, mask_node = mul.args
            with torch.no_grad():
                offset = graph.parameter(name).detach() * ~module.get_buffer(mask_node.target)
            buffer = f"_chop_offset_{len(changed)}"
            module.register_buffer(buffer, offset, persistent=False)
            with module.graph.inserting_before(mul):
                offset_node = module.graph.get_attr(buffer)
            mul.target = torch.ops.aten.sub.Tensor
            mul.args = (weight_node, offset_node)
            changed.append((mul, mask_node, offset_node, buffer))
        graph.recompile()
        yield
    finally:
        for mul, mask_node, offset_node, buffer in changed:
            mul.target = torch.ops.aten.mul.Tensor
            mul.args = (mul.args[0], mask_node)
            module.graph.erase_node(offset_node)
            delattr(module, buffer)
        graph.recompile()


@dataclass(frozen=True)
class IterativeSnip(Mask):
    """Prune in `steps` rounds of SNIP on the masked network, keeping keep^(t/T) (SNIP-it/FORCE)."""

    name: ClassVar[str] = "iterative-snip"
    kind: ClassVar[Literal["transform"]] = "transform"
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ("saliency", "mask")
    preserves: ClassVar[tuple[str, ...]] = ("channel_groups",)

    steps: int = option(5, "rounds of scoring and masking (1 = one-shot snip + mask)")
    allow_regrowth: bool = option(
        False, "FORCE: score the masked network's weights so pruned weights may return"
    )
    batches: int = option(1, "batches of data to score on in each round")
    bn: Literal["eval", "train"] = option("eval", "BatchNorm mode while scoring")
    accumulate: Literal["abs-of-sum", "sum-of-abs"] = option(
        "abs-of-sum", "over batches: |Σ g·w| (SynFlow/FORCE) or Σ |g·w| (Mikler)"
    )
    distributed: Literal["auto", "off"] = option(
        "auto", "with a torch.distributed process group (auto), score every round on all "
        "ranks' batches, so every rank masks alike; off: this rank's batches only"
    )

    def check(self) -> None:
        try:
            super().check()
        except OptionError as e:
            raise OptionError(f"{self.name}: {str(e).removeprefix('mask: ')}") from None
        if ":" in self.granularity:
            raise OptionError(
                f"{self.name}: granularity={self.granularity!r} fixes the sparsity of every "
                "round; use element or RxC block granularity (or run snip, mask for N:M)"
            )
        if self.steps < 1:
            raise OptionError(f"{self.name}: steps={self.steps} must be at least 1")
        if self.batches < 1:
            raise OptionError(f"{self.name}: batches={self.batches} must be at least 1")

    def data_batches(self) -> int:
        return self.batches

    def _refuse_regrowth(self, graph: Graph, first: float, target: float) -> None:
        """Raise :class:`OptionError` when the graph's masks already keep fewer of the selected
        weights (in all, or in a layer with ``scope=local``) than round 1 would: without
        ``allow_regrowth`` pruned weights rank last and tie, so the round would bring some
        back by position, not by score."""
        nodes = select_weights(graph, self.include, self.exclude, biases=self.biases,
                               norms=self.norms, embeddings=self.embeddings)
        counts = []
        for node in nodes:
            mask, numel = meta.entries(node).get("mask"), graph.parameter(node).numel()
            counts.append((node.target, numel if mask is None else int(mask.sum()), numel))
        groups = [counts] if self.scope == "global" else [[c] for c in counts]
        for group in groups:
            have, numel = sum(k for _, k, _ in group), sum(n for _, _, n in group)
            if numel and kept_count(numel, first) > have:
                where = "" if self.scope == "global" else f" of {group[0][0]}"
                raise OptionError(
                    f"{self.name}: the graph's masks already prune {1 - have / numel:.1%} of the "
                    f"weights it selects{where}, more than its first round's sparsity "
                    f"{first:.1%} (rounds go up to sparsity={target:g}); without allow_regrowth "
                    "a round cannot keep weights the masks pruned (they tie, and would come "
                    "back by position). Start from an unmasked graph, raise sparsity above "
                    f"{1 - have / numel:.3g} with steps=1, or set allow_regrowth=true")

    def mask_pass(self, sparsity: float) -> Mask:
        """The ``mask`` pass of one round: this pass's selection options at ``sparsity``."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(Mask)}
        return Mask(**{**options, "sparsity": sparsity})

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        target = 0.9 if self.sparsity is None else self.sparsity  # mask's default
        data = ctx.data  # a one-pass iterator was read into a list by the pass manager
        if not self.allow_regrowth:
            self._refuse_regrowth(graph, step_sparsity(target, 1, self.steps), target)
        rounds = []
        for step in range(1, self.steps + 1):
            scoring = straight_through(graph) if self.allow_regrowth else _nothing()
            with scoring:
                snip_saliency(
                    graph, data, ctx.loss, batches=self.batches, bn=self.bn,
                    accumulate=self.accumulate, distributed=self.distributed, track=ctx.track,
                    shared_data=ctx.shared_data,
                )
            selecting = (_nothing() if self.allow_regrowth
                         else pruned_last(graph, self.granularity))
            with selecting:
                result = self.mask_pass(step_sparsity(target, step, self.steps)).apply(
                    graph, ctx
                )
            kept = result.info["kept"]
            rounds.append(sum(k for k, _ in kept.values()))
        return PassResult(modified=True, info={"kept": kept, "rounds": rounds})


@contextmanager
def _nothing() -> Iterator[None]:
    yield
