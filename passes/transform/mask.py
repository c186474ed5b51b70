"""``mask``: keep the most salient weights, by inserting ``mul(weight, mask)`` nodes.

Each selected weight node gets a bool mask buffer (``<param>_mask`` on the same submodule, so it
is in ``state_dict`` and survives save/load) and a ``mul`` node right after it that the weight's
users read instead. Masked entries then get zero gradient and contribute zero, so training needs
no re-masking after optimizer steps. Running ``mask`` again updates the masks in place.

Selection works on *units*: single weights (``granularity=element``) or R×C blocks of the 2-D
weight (``"4x4"``, scored by the sum of their saliency; conv weights are seen as
``[out, in·kh·kw]``), or whole channels / attention heads (``channel``, ``head``: the groups of
the ``channel-groups`` analysis, scored by their members' summed saliency, removed from every
coupled layer so that ``shrink`` can cut them out; ``sparsity`` is then the share of the
selected layers' *parameters* removed, met by the fewest lowest-scoring units, at least one unit
of every group kept; ``round_to=R`` then moves each pruned group's kept channels to the nearest
multiple of R — see :mod:`chop.passes.analysis.group_select`). Channel/head and N:M skip
the selected layers they cannot prune (``strict=true``: an error instead); the pass info says
which and why: ``unprunable`` (layer -> reason) and, for channel/head, ``blocked`` (layer ->
``{units, of, kind, reason}``: its output channels or heads chop must keep), ``floor`` (group ->
units the floor kept) and ``removed`` (``{params, of, units}``). For element and block
granularity exactly round((1 − sparsity)·N) units are kept, N counted per layer
(``scope=local``) or over all selected layers (``scope=global``); ties are broken
deterministically by position (see :mod:`chop.kernels.select`). With global scope, per-layer bounds
(``min_sparsity``, ``max_sparsity``, ``min_keep``) are met exactly: layers whose share falls
outside their bounds are fixed at the bound and the rest re-selected, until none is outside.
``granularity="N:M"`` (e.g. ``"2:4"``) keeps the N highest-scoring of every M consecutive
weights along the input dimension instead, so its sparsity is 1 − N/M by construction.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch.fx import Node

from chop.errors import (
    DataError,
    InternalError,
    MissingMetadataError,
    OptionError,
    PassError,
)
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import insert_masks, select_weights
from chop.kernels.csr import csr_linear
from chop.kernels.reduce import has_nan, is_float8
from chop.kernels.select import (
    NaNScoresError,
    Piece,
    Reduce,
    keep_masks,
    keep_masks_and_flat,
    kept_count,
    mask_counts,
    true_counts,
    whole_numel,
)
from chop.pipeline.pass_base import Context, Pass, PassResult, option

log = logging.getLogger("chop")
_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^(\d+)x(\d+)$")


_IN_OUT = ("addmm", "mm", "matmul")  # x @ W: the weight is stored [in, out]


def _as_matrix(node: Node, score: torch.Tensor) -> torch.Tensor:
    """The weight as rows of its input dim, [out, in]: conv weights flattened per output
    channel (a transposed conv's, stored [in, out, *kernel], as [out, in·kernel] too), weights
    of ``x @ W`` (Conv1D/addmm, [..., in, out]) transposed, other linear weights ([..., out,
    in]: experts of a grouped product too) stacked by rows."""
    if score.dim() < 2:
        return score.reshape(1, -1)
    op = meta.entries(node).get("op")
    if op in _IN_OUT:
        score = score.transpose(-1, -2)
    elif meta.entries(node).get("role") != "linear":  # a conv: [out, in, *kernel]
        if str(op).startswith("conv_transpose"):
            score = score.transpose(0, 1)
        return score.reshape(score.shape[0], -1)
    return score.reshape(-1, score.shape[-1])


def _from_matrix(node: Node, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_as_matrix`: ``matrix`` in the weight's ``shape``."""
    op = meta.entries(node).get("op")
    if len(shape) >= 2 and op in _IN_OUT:
        return matrix.reshape(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if len(shape) >= 3 and str(op).startswith("conv_transpose"):
        return matrix.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1).contiguous()
    return matrix.reshape(shape)


def _nm_mask(node: Node, score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores along the input dimension."""
    matrix = _as_matrix(node, score)
    if matrix.shape[1] % m:
        raise OptionError(
            f"mask: granularity {n}:{m} needs the input dimension of {node.target} "
            f"({matrix.shape[1]}) to be a multiple of {m}; exclude it with exclude='...' or "
            "use another pattern"
        )
    groups = matrix.reshape(-1, m)
    order = torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n]
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return _from_matrix(node, kept.reshape(matrix.shape), score.shape)


def _block_scores(node: Node, score: torch.Tensor, r: int, c: int) -> torch.Tensor:
    matrix = _as_matrix(node, score)
    rows, cols = matrix.shape
    if rows % r or cols % c:
        raise OptionError(
            f"mask: granularity {r}x{c} needs {node.target}, seen as a {rows}x{cols} matrix, "
            f"to divide into {r}x{c} blocks; exclude it with exclude='...' or use another block size"
        )
    return matrix.reshape(rows // r, r, cols // c, c).sum(dim=(1, 3))


def _expand_blocks(node: Node, kept: torch.Tensor, r: int, c: int, shape: torch.Size) -> torch.Tensor:
    matrix = kept.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return _from_matrix(node, matrix, shape)


def layer_counts(
    scores: list[torch.Tensor | Piece],
    sparsity: float,
    scope: str,
    *,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    min_keep: int = 0,
    reduce: Reduce | None = None,
) -> list[torch.Tensor]:
    """Bool keep-masks over ``scores`` (one tensor of unit scores per layer) with exact counts.

    Local scope keeps round((1 − sparsity)·N_l) per layer, global round((1 − sparsity)·N) over
    all layers; either way each layer's count is clipped to its bounds
    [max(round((1 − max_sparsity)·N_l), min_keep), round((1 − min_sparsity)·N_l)].

    Global scope with bounds is one global ranking cut at the point r where the clipped counts
    sum to the budget: F(r) = Σ_l clip(c_l(r)) grows by at most 1 per rank, so such an r exists.
    Selecting the budget's top units gives c_l(r0); if F(r0) is below the budget then r > r0 and
    every layer above its upper bound stays there, so those layers are fixed; if above, the
    layers under their lower bound are fixed. The rest are re-selected, at most once per layer.

    Sharded layers: pass each layer's :class:`~chop.kernels.select.Piece` on this process and
    ``reduce`` (see :mod:`chop.kernels.select`); N_l, the counts and every selection are then
    those of the whole layers, and the masks (shaped like the pieces) are the ones a single
    process would make. Every process must make the same call.
    """
    sizes = [whole_numel(s) for s in scores]
    upper = sizes if min_sparsity == 0.0 else [kept_count(n, min_sparsity) for n in sizes]
    lower = ([0] * len(sizes) if max_sparsity == 1.0 and min_keep == 0
             else [min(n, max(kept_count(n, max_sparsity), min_keep)) for n in sizes])
    if scope == "local":
        return [keep_masks([s], min(max(kept_count(n, sparsity), lo), hi), reduce=reduce)[0]
                for s, n, lo, hi in zip(scores, sizes, lower, upper)]
    budget = min(max(kept_count(sum(sizes), sparsity), sum(lower)), sum(upper))
    if all(lo == 0 and hi == n for n, lo, hi in zip(sizes, lower, upper)):
        return keep_masks(scores, budget, reduce=reduce)  # no bounds: one selection, no counting
    free, masks = list(range(len(scores))), {}
    while free:
        chosen = dict(zip(free, keep_masks([scores[i] for i in free], budget, reduce=reduce)))
        counted = mask_counts(list(chosen.values()), [scores[i] for i in free], reduce=reduce)
        counts = dict(zip(free, counted))
        clipped = {i: min(max(k, lower[i]), upper[i]) for i, k in counts.items()}
        excess = sum(clipped.values()) - budget
        if excess == 0:
            for i in free:
                same = clipped[i] == counts[i]
                masks[i] = chosen[i] if same else keep_masks([scores[i]], clipped[i],
                                                             reduce=reduce)[0]
            break
        side = [i for i in free if (counts[i] > upper[i] if excess < 0 else counts[i] < lower[i])]
        if not side:  # impossible when the selection kept exactly the budget
            raise InternalError(
                f"mask: the selection kept {sum(counts.values())} units for a budget of "
                f"{budget}; with pieces over processes, do pieces overlap or copies differ?"
            )
        for i in side:
            masks[i] = keep_masks([scores[i]], clipped[i], reduce=reduce)[0]
            budget -= clipped[i]
        free = [i for i in free if i not in side]
    return [masks[i] for i in range(len(scores))]


def _structured_masks(
    graph: Graph, nodes: list[Node], sparsity: float, scope: str, granularity: str, *,
    min_keep: int = 0, strict: bool = False, report: dict | None = None, round_to: int = 1,
) -> dict[str, torch.Tensor]:
    """Masks removing whole channels or heads, chosen by
    :func:`chop.passes.analysis.group_select.structured_selection` (a parameter budget, a
    floor of one unit per group); what it could not prune goes into ``report``."""
    from chop.passes.analysis.group_select import structured_selection

    selection = structured_selection(graph, [n.target for n in nodes], sparsity, scope,
                                     granularity, min_keep=min_keep, strict=strict,
                                     round_to=round_to)
    if report is not None:
        report.update(selection.info())
    return selection.masks


def mask_weights(
    graph: Graph,
    nodes: list[Node],
    sparsity: float | None,
    scope: str = "global",
    *,
    granularity: str = "element",
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    min_keep: int = 0,
    strict: bool = False,
    report: dict | None = None,
    round_to: int = 1,
) -> dict[str, torch.Tensor]:
    """Mask ``nodes`` keeping the highest-saliency weights; returns the masks by name.

    Channel/head and N:M granularities skip the layers they cannot prune (an error with
    ``strict``); ``report``, if given, receives the kept entries (``kept``: layer ->
    ``(kept, numel)``), what was skipped and why (``unprunable``: layer -> reason) and, for
    channel/head, ``blocked``, ``floor`` and ``removed`` (see
    :class:`chop.passes.analysis.group_select.Selection`). ``round_to`` (channel/head only):
    each pruned group keeps a multiple of it (see :mod:`chop.passes.analysis.group_select`)."""
    report = {} if report is None else report
    report.setdefault("unprunable", {})
    scores = []
    for node in nodes:
        score = meta.entries(node).get("saliency")
        if score is None:
            from chop.pipeline.registry import providers

            raise MissingMetadataError(
                f"weight {node.target} has no saliency; run a criterion that scores it before "
                f"mask ({', '.join(providers('saliency'))})"
            )
        scores.append(score)
    nm, block = _NM.match(granularity), _BLOCK.match(granularity)
    if nm or block:  # torch neither sorts nor sums one-byte floats; float32 holds them exactly
        scores = [s.float() if is_float8(s) else s for s in scores]
    if granularity in ("channel", "head") or nm:  # the element path finds NaN as it selects
        for node, score in zip(nodes, scores):
            if has_nan(score):
                raise _nan_scores(node.target)
    if granularity in ("channel", "head"):
        masks_by_name = _structured_masks(
            graph, nodes, 0.9 if sparsity is None else sparsity, scope, granularity,
            min_keep=min_keep, strict=strict, report=report, round_to=round_to,
        )
        nodes = [graph.weight_node(name) for name in masks_by_name]
        masks = list(masks_by_name.values())
    elif nm:
        n, m = int(nm[1]), int(nm[2])
        fits = [strict or _as_matrix(node, s).shape[1] % m == 0 for node, s in zip(nodes, scores)]
        for node, s, ok in zip(nodes, scores, fits):
            if not ok:
                report["unprunable"][node.target] = (
                    f"its input size {_as_matrix(node, s).shape[1]} is not a multiple of {m}")
        nodes, scores = ([x for x, ok in zip(xs, fits) if ok] for xs in (nodes, scores))
        masks = [_nm_mask(node, s, n, m) for node, s in zip(nodes, scores)]
    else:
        r, c = (int(block[1]), int(block[2])) if block else (1, 1)
        units = [_block_scores(node, s, r, c) if block else s for node, s in zip(nodes, scores)]
        kept, _ = ranked_masks([n.target for n in nodes], units,
                               0.9 if sparsity is None else sparsity, scope,
                               min_sparsity=min_sparsity, max_sparsity=max_sparsity,
                               min_keep=min_keep)
        masks = [_expand_blocks(node, k, r, c, s.shape) if block else k
                 for node, k, s in zip(nodes, kept, scores)]
    before = [meta.entries(n).get("mask") for n in nodes]
    if insert_masks(graph, nodes, masks):
        graph.recompile()
    counts = true_counts(masks)
    warn_emptied([n.target for n in nodes], [m.numel() for m in masks], counts,
                 lambda i: before[i] is None or bool(before[i].any()))
    report["kept"] = {n.target: (c, m.numel()) for n, m, c in zip(nodes, masks, counts)}
    return {n.target: m for n, m in zip(nodes, masks)}


def ranked_masks(names: list[str], scores: list[torch.Tensor], sparsity: float, scope: str, *,
                 min_sparsity: float = 0.0, max_sparsity: float = 1.0, min_keep: int = 0,
                 split: bool = True) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """:func:`layer_counts` over the weights ``names`` (their unit scores, on this process),
    NaN scores refused with the name of a weight that holds them; and, for one global ranking
    without bounds on a small model, the masks as one flat tensor too
    (:func:`~chop.kernels.select.keep_masks_and_flat`, which with ``split`` False leaves the
    masks unmade then; else None)."""
    try:
        if scope == "global" and (min_sparsity, max_sparsity, min_keep) == (0.0, 1.0, 0):
            total = sum(s.numel() for s in scores)
            return keep_masks_and_flat(scores, kept_count(total, sparsity), split=split)
        return layer_counts(scores, sparsity, scope, min_sparsity=min_sparsity,
                            max_sparsity=max_sparsity, min_keep=min_keep), None
    except NaNScoresError as e:
        name = next(n for n, s in zip(names, scores) if has_nan(s))
        raise _nan_scores(name) from e


def warn_emptied(names: list[str], numels: list[int], counts: list[int],
                 nonempty_before: Callable[[int], bool]) -> None:
    """Warn when a new mask (``counts`` kept of ``numels``) empties a layer of ``names`` that
    was not empty before (``nonempty_before(i)``; a Pruner masks at every step, and a layer
    re-masked empty is not news)."""
    empty = [i for i, (n, c) in enumerate(zip(numels, counts)) if n and not c]
    new = [names[i] for i in empty if nonempty_before(i)]
    if new:
        log.warning(
            "mask emptied %d layer(s): %s; the network may be disconnected (lower the sparsity, "
            "set min_keep, or use scope=local)", len(new), ", ".join(new),
        )
    elif empty:
        log.debug("mask: %d layer(s) stay empty: %s", len(empty),
                  ", ".join(names[i] for i in empty))


def _nan_scores(name: str) -> DataError:
    return DataError(
        f"the saliency of {name} holds NaN, which cannot be ranked: the criterion's loss was "
        "not finite on the data (look for NaN or inf in the inputs) or the criterion "
        "overflowed in this dtype (score in float32 or float64)"
    )


@dataclass(frozen=True)
class Mask(Pass):
    """Keep the top (1 − sparsity) weights by saliency; insert mul(weight, mask) nodes."""

    name: ClassVar[str] = "mask"
    kind: ClassVar[Literal["transform"]] = "transform"
    requires: ClassVar[tuple[str, ...]] = ("saliency",)
    provides: ClassVar[tuple[str, ...]] = ("mask",)
    preserves: ClassVar[tuple[str, ...]] = ("saliency", "channel_groups")

    sparsity: float | None = option(
        None, "fraction of the selected weights to prune, in [0, 1); default 0.9 (N:M sets its "
              "own); channel/head: the share of the selected layers' parameters removed"
    )
    scope: Literal["global", "local"] = option(
        "global", "rank weights over all selected layers together, or per layer"
    )
    granularity: str = option(
        "element", "element, channel, head, RxC blocks (e.g. '4x4'), or N:M (e.g. '2:4')"
    )
    min_sparsity: float = option(0.0, "per-layer lower bound on sparsity (global scope)")
    max_sparsity: float = option(1.0, "per-layer upper bound on sparsity (global scope)")
    min_keep: int = option(0, "keep at least this many weights (or blocks) in every layer; "
                              "channel/head: units per channel group (at least 1)")
    include: str | None = option(None, "regex: only prune parameters whose name matches")
    exclude: str | None = option(None, "regex: never prune parameters whose name matches")
    biases: bool = option(False, "also prune biases")
    norms: bool = option(False, "also prune normalisation weights (batch/layer/group norm)")
    embeddings: bool = option(False, "also prune embedding tables (incl. tied output heads)")
    strict: bool = option(False, "channel/head/N:M: a selected layer the granularity cannot "
                                 "prune is an error (default: skipped and reported)")
    round_to: int = option(1, "channel/head: each pruned group keeps a multiple of this many "
                              "channels (nearest multiple of the budget's count; 8 or 16 suit "
                              "GPUs and vector units)")

    def pattern_sparsity(self) -> float | None:
        """The sparsity an N:M granularity fixes (1 − N/M), else None."""
        nm = _NM.match(self.granularity)
        return 1 - int(nm[1]) / int(nm[2]) if nm else None

    def selected(self, graph: Graph) -> list[Node]:
        """The weight nodes these options select (``include``, ``exclude``, roles); raises
        when they select none or ``include`` names a weight the roles leave out."""
        nodes = select_weights(
            graph, self.include, self.exclude,
            biases=self.biases, norms=self.norms, embeddings=self.embeddings,
        )
        _check_include(graph, self.include, nodes)
        if not nodes:
            prunable = [n.target for n in graph.weight_nodes()
                        if meta.entries(n).get("role") in ("linear", "conv")]
            if prunable:
                raise OptionError(
                    f"mask selected no weights of {graph.name} (include={self.include!r}, "
                    f"exclude={self.exclude!r}); prunable parameters are: " + ", ".join(prunable)
                )
            used = sorted({str(getattr(u.target, "__name__", u.target))
                           for n in graph.weight_nodes() for u in n.users})
            raise PassError(
                f"{graph.name} has no weight chop recognises as a linear or conv layer's (one "
                "used by linear, conv, embedding, or matmul/addmm as the right-hand operand), "
                f"so mask has nothing to prune; its weights are used by: {', '.join(used[:8])}"
                + (" …" if len(used) > 8 else "")
            )
        return nodes

    def check(self) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise OptionError(
                f"mask: sparsity={self.sparsity} is out of range; it must be in [0, 1) "
                "(0.9 prunes 90% and keeps 10%)"
            )
        for key in ("min_sparsity", "max_sparsity"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise OptionError(f"mask: {key}={getattr(self, key)} must be in [0, 1]")
        if self.min_sparsity > self.max_sparsity:
            raise OptionError(
                f"mask: min_sparsity={self.min_sparsity} is above max_sparsity={self.max_sparsity}"
            )
        if self.min_keep < 0:
            raise OptionError(f"mask: min_keep={self.min_keep} must be 0 or more")
        bounded = [k for k, default in (("min_sparsity", 0.0), ("max_sparsity", 1.0))
                   if getattr(self, k) != default]
        if bounded and self.granularity in ("channel", "head"):
            raise OptionError(
                f"mask: {' and '.join(bounded)} bound(s) each layer's sparsity in element and "
                f"block selection; granularity={self.granularity} removes whole channel groups "
                "under one parameter budget and cannot honour per-layer bounds: remove "
                f"{' and '.join(bounded)} (min_keep keeps units in every group)")
        nm, block = _NM.match(self.granularity), _BLOCK.match(self.granularity)
        if not (self.granularity in ("element", "channel", "head") or nm or block):
            raise OptionError(
                f"mask: granularity={self.granularity!r} is not one of: element, channel, head, "
                "RxC blocks (e.g. '4x4'), N:M (e.g. '2:4')"
            )
        if nm and not 0 < int(nm[1]) <= int(nm[2]):
            raise OptionError(f"mask: granularity {self.granularity} needs 0 < N <= M")
        if nm and self.sparsity is not None:
            raise OptionError(
                f"mask: granularity {self.granularity} fixes the sparsity at "
                f"{1 - int(nm[1]) / int(nm[2]):g}; remove sparsity={self.sparsity}"
            )
        fixed = bounded + (["min_keep"] if self.min_keep else [])
        if nm and fixed:
            raise OptionError(
                f"mask: granularity {self.granularity} keeps {nm[1]} of every {nm[2]} weights in "
                f"each layer, whatever its scores, so {' and '.join(fixed)} would change "
                f"nothing; remove {' and '.join(fixed)} (exclude layers with exclude='...')")
        if block and (int(block[1]) < 1 or int(block[2]) < 1):
            raise OptionError(f"mask: block granularity {self.granularity} needs sizes >= 1")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise OptionError(f"mask: round_to={self.round_to!r} must be an integer >= 1 "
                              "(e.g. round_to=8)")
        if self.round_to > 1 and self.granularity not in ("channel", "head"):
            raise OptionError(
                f"mask: round_to={self.round_to} rounds the kept channels of channel groups, so it "
                f"needs granularity=channel or head, not {self.granularity}; set "
                "granularity=channel (or head), or remove round_to")
        for key in ("include", "exclude"):
            pattern = getattr(self, key)
            try:
                re.compile(pattern or "")
            except re.error as e:
                raise OptionError(f"mask: {key}={pattern!r} is not a valid regex: {e}") from None

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        stored = graph.module.graph.find_nodes(op="call_function", target=csr_linear)
        if stored:  # a global budget would fall on the dense layers alone
            raise PassError(
                f"{graph.name} holds {len(stored)} layer(s) that the sparse export stored as "
                "CSR, which mask cannot prune again; put mask before sparse in the pipeline "
                "(e.g. \"snip, mask, sparse\"), starting from the model before sparse"
            )
        nodes = self.selected(graph)
        report: dict = {}
        mask_weights(
            graph, nodes, self.sparsity, self.scope, granularity=self.granularity,
            min_sparsity=self.min_sparsity, max_sparsity=self.max_sparsity, min_keep=self.min_keep,
            strict=self.strict, report=report, round_to=self.round_to,
        )
        for name, why in report["unprunable"].items():
            log.info("mask: %s is not pruned (granularity=%s): %s", name, self.granularity, why)
        kept = report.pop("kept")
        removed = report.get("removed", {})
        if self.scope == "local" and removed.get("of") and self.sparsity is not None and (
                removed["params"] / removed["of"] > self.sparsity + 0.02):
            log.warning(
                "mask: scope=local removed %.1f%% of the pruned layers' parameters (sparsity=%g): "
                "each channel group removes that share of its own parameters, and a layer "
                "between two pruned groups loses rows and columns; scope=global meets the "
                "share in total", 100 * removed["params"] / removed["of"], self.sparsity)
        asked = 0.9 if self.sparsity is None else self.sparsity
        if self.round_to > 1 and removed.get("of") and (
                removed["params"] < 0.5 * asked * removed["of"]):
            log.warning(
                "mask: round_to=%d removed %.1f%% of the pruned layers' parameters (sparsity=%g): "
                "each channel group keeps a multiple of %d channels, at least %d, so a group of "
                "%d channels or fewer keeps them all; lower round_to (or leave it out)",
                self.round_to, 100 * removed["params"] / removed["of"], asked, self.round_to,
                self.round_to, self.round_to)
        if not kept and report["unprunable"] and not removed.get("of"):
            # a structured mask with no layer it may prune (a budget that removes nothing, as
            # at sparsity 0, also leaves no mask: then "of" counts the prunable layers' weights)
            reasons = list(report["unprunable"].items())
            raise PassError(
                f"mask{{granularity={self.granularity}}}: no weight of {graph.name} can be pruned "
                f"at this granularity, so the model would be written unpruned. Why, per layer: "
                + "; ".join(f"{name}: {why}" for name, why in reasons[:3])
                + (f"; … ({len(reasons) - 3} more)" if len(reasons) > 3 else "")
                + (". Use granularity=element (or channel), or prune another model"
                   if self.granularity == "head" else
                   ". Use granularity=element, or prune another model"))
        return PassResult(modified=True, info={"kept": kept, **report})


def _check_include(graph: Graph, include: str | None, nodes: list[Node]) -> None:
    """``include`` that spells out a parameter (a full match of its name) which the role
    options leave out is a mistake: say which and why instead of ignoring it."""
    if include is None:
        return
    chosen = {n.target for n in nodes}
    for node in graph.weight_nodes():
        if node.target not in chosen and re.fullmatch(include, node.target):
            role = meta.entries(node).get("role")
            fix = {"bias": "set biases=true", "norm": "set norms=true",
                   "embedding": "set embeddings=true"}.get(
                role, f"chop does not know how {meta.entries(node).get('op')!r} uses it, so it "
                      "cannot mask it")
            raise OptionError(f"mask: include={include!r} names {node.target} (a {role} weight), "
                              f"which is not selected: {fix}")
