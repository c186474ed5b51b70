"""Structured selection over channel groups: score channels and heads, choose which go under a
parameter budget, turn keep decisions into per-parameter masks, and say which layers a
granularity cannot prune and why.

:func:`structured_selection` is what ``mask{granularity=channel|head}`` runs. Under ``channel``
every removable unit counts (a channel, or a whole head where channels only go by heads); under
``head`` only attention heads. ``sparsity`` is the share of the selected layers' *parameters*
removed: units go in order of increasing score (the sum of their members' saliency; ties by group
then unit index, so the choice is deterministic) until the removed parameters of the selected
layers reach ``N − round((1 − sparsity)·N)``, so the result overshoots the budget by less than one
unit. Global scope counts N over every selected layer that the granularity can prune, exactly
(an entry both in a removed row and a removed column counts once); local scope gives each group
the budget of its own parameters. Every group keeps at least ``max(min_keep, 1)`` units (shrink
never empties a tensor); the floor, the layers the granularity cannot prune (with the reason) and
the units chop must keep are reported, not raised, unless ``strict``.

``round_to=R`` (as Torch-Pruning's ``round_to``, for hardware that likes channel counts in
multiples of 8 or 16): after the budget is met, each pruned group's kept channel count is moved
to the *nearest* multiple of R (halves up), never below one multiple (nor the floor) and never
above the group's size (a group smaller than R keeps everything). Rounding down removes the
group's next-lowest-scoring units, rounding up restores its highest-scoring removed ones; where
chop must keep too many units to round down, it rounds up. So the budget is met before rounding
and missed after it by less than R/2 channels' parameters per group, either way; the pass info's
``removed.params`` is what was really removed. A unit that owns c channels (a head of
``head_dim`` c) counts as c: the unit count is rounded to a multiple of R / gcd(R, c).

The building blocks, for other rules::

    groups = stored_channel_groups(graph)
    require_granularity(groups, [n.target for n in nodes], "channel")
    scores = group_scores(graph, groups)                       # {group id: score per channel}
    keep = {gid: s >= s.median() for gid, s in scores.items()}  # any rule
    for name, mask in group_masks(graph, groups, keep).items():
        insert_mask(graph, graph.weight_node(name), mask)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from chop.errors import GranularityError, MissingMetadataError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.kernels.select import kept_count
from chop.passes.analysis.channel_groups import (
    ChannelGroups,
    Group,
    Member,
    stored_channel_groups,
)
from chop.passes.analysis.flow.rule import RULES
from chop.passes.analysis.flow.rules.producers import Producer

Granularity = Literal["channel", "head"]


def matches(group: Group, granularity: Granularity) -> bool:
    """Whether ``group`` is pruned under ``granularity``: ``head`` takes head groups only,
    ``channel`` every group (a head is the unit of channels that only go by heads)."""
    return granularity == "channel" or group.kind == granularity


def group_scores(graph: Graph, groups: ChannelGroups, key: str = "saliency",
                 granularity: Granularity | None = None) -> dict[int, torch.Tensor]:
    """A score per channel (or head) of every group: the sum of its members' ``key`` entries
    (SNAP-it's node saliency: the rows it produces, the columns that read it, its norm
    parameters). Members without the entry contribute nothing; a group none of whose members
    carries it is left out. Unprunable channels score like the others (check ``prunable``).
    No group of ``granularity``: an empty dict."""
    nodes = {n.target: n for n in graph.weight_nodes()}
    chosen = [g for g in groups if granularity is None or matches(g, granularity)]
    out: dict[int, torch.Tensor] = {}
    per_index: dict[tuple[str, int], torch.Tensor] = {}  # a member dim's sums, once
    for g in chosen:
        score, found = torch.zeros(g.size, dtype=torch.float64), False
        for m in g.members:
            value = meta.entries(nodes[m.name]).get(key) if m.name in nodes else None
            if value is None:
                continue
            found = True
            sums = per_index.get((m.name, m.dim))
            if sums is None:
                sums = per_index[m.name, m.dim] = dim_sums(value.detach(), m.dim)
            if m.single:  # one index per unit (most): one gather
                score += sums[m.flat]
            else:
                score += torch.stack([sums[i].sum() for i in m.index])
        if found:
            out[g.id] = score
    if chosen and not out:
        raise MissingMetadataError(
            f"no channel group of {graph.name} has a {key!r} entry; run a criterion (snip, "
            "magnitude, random) before scoring groups")
    return out


_SUM_CHUNK = 2**20  # entries cast to float64 at a time: 8 MB, which stays in cache


def dim_sums(value: torch.Tensor, dim: int) -> torch.Tensor:
    """``value`` summed in float64 over every dim but ``dim``, in blocks of rows of at most
    ``_SUM_CHUNK`` entries: ``sum(dtype=float64)`` casts its whole input first, and on a large
    tensor (a word embedding) that cast, out of cache, costs several times the sum. The float64
    partial sums of the blocks are added in order. For ``dim`` > 0 the rows are summed first
    (a vectorised pass over contiguous memory) and the other dims after, on the small result:
    summing a conv weight's 3×3 kernels first is several times slower."""
    others = [d for d in range(value.dim()) if d != dim]
    if not others:
        return value.double()
    rows = max(1, _SUM_CHUNK * value.shape[0] // max(value.numel(), 1))
    blocks = value.split(rows) if value.numel() > _SUM_CHUNK and value.shape[0] > 1 else [value]
    if dim == 0:
        sums = [b.sum(others, dtype=torch.float64) for b in blocks]
        return sums[0] if len(sums) == 1 else torch.cat(sums)
    total = blocks[0].sum(0, dtype=torch.float64)
    for block in blocks[1:]:
        total += block.sum(0, dtype=torch.float64)
    inner = [d - 1 for d in others[1:]]  # the dims left besides ``dim``, now one lower
    return total.sum(inner) if inner else total


def group_masks(graph: Graph, groups: ChannelGroups, keep: Mapping[int, torch.Tensor],
                roles: Iterable[str] = ("linear", "conv")) -> dict[str, torch.Tensor]:
    """Per-parameter bool masks (True = kept) that remove the channels ``keep`` drops: whole
    rows, columns and per-channel entries of every member whose weight role is in ``roles``.

    Args:
        keep: group id -> bool tensor of the group's size (True = keep that channel/head).
            Groups not listed keep everything.
        roles: which members get masks (``chop.trace`` roles: linear, conv, norm, bias…).

    Raises:
        GranularityError: a keep vector of the wrong size, or one that drops a channel the
            analysis marked unprunable (the message names the layers and the reason).
    """
    roles = set(roles)
    params = dict(graph.module.named_parameters())
    role_of = {n.target: meta.entries(n).get("role") for n in graph.weight_nodes()}
    masks: dict[str, torch.Tensor] = {}
    for gid, decision in keep.items():
        g = groups[gid]
        decision = torch.as_tensor(decision, dtype=torch.bool)
        if decision.shape != (g.size,):
            raise GranularityError(
                f"keep[{gid}] has shape {tuple(decision.shape)}; group {gid} "
                f"({', '.join(g.layers('out')) or ', '.join(g.layers())}) has {g.size} channels")
        bad = (~decision & ~g.prunable).nonzero().flatten().tolist()
        if bad:
            raise GranularityError(
                f"cannot remove channel {bad[0]} of group {gid} (layers "
                f"{', '.join(g.layers())}): {g.blocked[bad[0]]}. Keep it (see "
                "ChannelGroups.unprunable())")
        dropped = (~decision).nonzero().flatten()
        for m in g.members:
            if m.kind != "parameter" or role_of.get(m.name) not in roles:
                continue
            mask = masks.setdefault(m.name, torch.ones_like(params[m.name], dtype=torch.bool))
            if dropped.numel():
                mask.index_fill_(m.dim, m.indices(dropped), False)
    return masks


def unprunable_reason(groups: ChannelGroups, name: str, granularity: Granularity,
                      op: str | None = None) -> str | None:
    """Why layer ``name`` cannot be pruned under ``granularity`` (no group of that kind it is a
    member of, by rows or columns, has a removable unit), or None if it can. ``op``: the op
    that reads the weight (its ``op`` metadata), named when channel groups do not follow it."""
    mine = [g for g in groups.of(name) if matches(g, granularity)]
    if any(bool(g.prunable.any()) for g in mine):
        return None
    others = [g for g in groups.of(name) if not matches(g, granularity) and bool(g.prunable.any())]
    reasons = [r for role in ("out", "channel", "in") for g in groups.of(name, role)
               if matches(g, granularity) for r in g.blocked if r]
    why = (f"its {granularity}s cannot be removed: {reasons[0]}" if reasons else
           f"it is in no {granularity} group")
    if not reasons and op is not None and not _followed(op):
        why += (f" (its weight is used by {op}; channels are removed from linear, addmm, conv "
                "and x @ wᵀ layers)")
    hint = f"; it can be pruned with granularity={others[0].kind}" if others else ""
    return f"{why}{hint}"


def _followed(op: str) -> bool:
    """Whether channel groups follow the weights of ``op`` (a weight's ``op`` metadata; as
    ``t+matmul``, x @ wᵀ): a weight op of the channel rules."""
    return op.removeprefix("t+") in {getattr(o, "__name__", str(o)) for o, rule in RULES.items()
                                     if isinstance(rule, Producer)}


def require_granularity(groups: ChannelGroups, names: Iterable[str], granularity: Granularity) -> None:
    """Raise :class:`GranularityError` naming the first layer in ``names`` that no prunable group
    of this granularity covers (e.g. ``granularity=head`` on a CNN, or the output layer)."""
    if granularity not in ("channel", "head"):
        raise GranularityError(f"unknown structured granularity {granularity!r}; use channel or head")
    names = list(names)
    _require_heads(groups, names, granularity)
    for name in names:
        why = unprunable_reason(groups, name, granularity)
        if why is not None:
            raise GranularityError(
                f"granularity={granularity}: layer {name} cannot be pruned this way: {why}. "
                "Exclude it (exclude='...'), use granularity=element, or drop strict=true to "
                "skip it")


def _require_heads(groups: ChannelGroups, names: list[str], granularity: Granularity) -> None:
    if granularity != "head" or any(g.kind == "head" for g in groups):
        return
    # what stopped the channels of the attention projections is what stopped their heads
    attention = [n for n in names if _ATTENTION.search(n)]
    found = next(((n, r) for n in attention for role in ("out", "channel", "in")
                  for g in groups.of(n, role) for r in g.blocked if r), None)
    where = (f"; at {found[0]}: {found[1]}" if found else
             f"; layer {names[0] if names else '?'} is in no attention head")
    raise GranularityError(
        "granularity=head: the model has no attention heads chop can prune (it recognises "
        "scaled_dot_product_attention or q @ kᵀ attention fed by per-head views of linear "
        "outputs; under grouped-query attention a key/value head goes with the query heads "
        f"that share it, and with a single key/value head no head can go alone){where}. Use "
        "granularity=channel or element")


_ATTENTION = re.compile(r"(^|[._])(q|k|v|qkv|query|key|value|query_key_value|c_attn|in_proj|"
                        r"[qkv]_proj|qkv_proj|attn|attention|self_attn|self_attention)([._]|$)")


@dataclass
class Selection:
    """What :func:`structured_selection` chose, and what it could not do.

    Attributes:
        masks: per-parameter bool masks (True = kept) for every coupled layer.
        keep: group id -> bool per unit (True = kept), for the groups it ranked.
        unprunable: selected layer -> why the granularity cannot prune it (skipped).
        blocked: selected layer -> ``{"units", "of", "kind", "reason"}``: its output units
            (channels or heads) chop must keep, and the first reason.
        floor: group (its producing layers, comma-joined) -> units the floor kept that the
            ranking would have removed.
        params: ``(removed, of)``: parameters removed from the selected prunable layers, of all
            their parameters.
    """

    masks: dict[str, torch.Tensor]
    keep: dict[int, torch.Tensor]
    unprunable: dict[str, str] = field(default_factory=dict)
    blocked: dict[str, dict[str, Any]] = field(default_factory=dict)
    floor: dict[str, int] = field(default_factory=dict)
    params: tuple[int, int] = (0, 0)

    def info(self) -> dict[str, Any]:
        """The mask pass's info entries (see the module doc of :mod:`chop.passes.transform.mask`)."""
        removed, of = self.params
        return {"unprunable": dict(self.unprunable), "blocked": dict(self.blocked),
                "floor": dict(self.floor),
                "removed": {"params": removed, "of": of,
                            "units": sum(int((~k).sum()) for k in self.keep.values())}}


def structured_selection(
    graph: Graph, names: Iterable[str], sparsity: float, scope: str = "global",
    granularity: Granularity = "channel", *, min_keep: int = 0, strict: bool = False,
    key: str = "saliency", round_to: int = 1,
) -> Selection:
    """Choose the channels (or heads) to remove from the selected layers ``names``; see the
    module doc for the budget, the order, the floor and what is reported.

    Raises:
        GranularityError: ``granularity=head`` on a model without heads; with ``strict``, a
            selected layer the granularity cannot prune.
        MissingMetadataError: no group member carries ``key``.
    """
    if granularity not in ("channel", "head"):
        raise GranularityError(f"unknown structured granularity {granularity!r}; use channel or head")
    groups = stored_channel_groups(graph)
    names = list(dict.fromkeys(names))
    if granularity == "head":
        _require_heads(groups, names, granularity)  # a model without heads is an error, always
        heads = {m.name for g in groups if g.kind == "head" for m in g.members}
        names = [n for n in names if n in heads] or names  # heads cover the attention layers
    if strict:
        require_granularity(groups, names, granularity)
    selection = Selection({}, {})
    for name in names:
        why = unprunable_reason(groups, name, granularity,
                                meta.entries(graph.weight_node(name)).get("op"))
        if why is not None:
            selection.unprunable[name] = why
        out = [g for g in groups.of(name, "out") if matches(g, granularity)]
        stuck = sum(int((~g.prunable).sum()) for g in out)
        if stuck:
            reason = next(r for g in out for r in g.blocked if r)
            selection.blocked[name] = {"units": stuck, "of": sum(g.size for g in out),
                                       "kind": granularity, "reason": reason}
    chosen = set(names) - set(selection.unprunable)
    params = {n: p for n, p in graph.module.named_parameters() if n in chosen}
    candidates = [g for g in groups if matches(g, granularity) and bool(g.prunable.any())
                  and any(m.name in chosen and m.role == "out" for m in g.members)]
    all_scores = group_scores(graph, groups, key) if candidates else {}
    candidates = [g for g in candidates if g.id in all_scores]
    floor = max(min_keep, 1)
    budget = _Budget(params)
    total = sum(p.numel() for p in params.values())
    kept: dict[int, torch.Tensor] = {}  # per ranked group, per unit

    def take(gs: list[Group], gi: torch.Tensor, us: torch.Tensor, budget_left: int,
             exact: bool) -> None:
        """Remove the ranked units (``gs[gi[i]]``'s unit ``us[i]``, in order) until
        ``budget_left`` parameters went, skipping those of a group down to its floor: what a
        loop over the units would do, for all of them at once (tens of thousands on a BERT)."""
        if not len(gi):
            return
        # a group's j-th unit in the ranking goes while the group keeps more than the floor
        sizes = torch.tensor([g.size for g in gs], dtype=torch.long)
        by = torch.argsort(gi, stable=True)
        per_group = torch.bincount(gi, minlength=len(gs))
        j = torch.empty_like(gi)
        j[by] = torch.arange(len(gi)) - (per_group.cumsum(0) - per_group)[gi[by]]
        taken = j < sizes[gi] - floor
        got = budget.removed(gs, gi, us, taken, exact)
        over = (got.cumsum(0) - got >= budget_left).nonzero().flatten()  # got before each unit
        stop = int(over[0]) if over.numel() else len(gi)
        gi, us, taken = gi[:stop], us[:stop], taken[:stop]
        # the groups (and the floors) in the order the loop would meet them
        met = torch.full((len(gs),), stop, dtype=torch.long)
        met.scatter_reduce_(0, gi, torch.arange(stop), "amin")
        skipped = torch.full((len(gs),), stop, dtype=torch.long)
        skipped.scatter_reduce_(0, gi[~taken], (~taken).nonzero().flatten(), "amin")
        skips = torch.bincount(gi[~taken], minlength=len(gs)).tolist()
        for k in torch.argsort(met).tolist():
            if int(met[k]) == stop:
                break
            keep = kept[gs[k].id] = torch.ones(gs[k].size, dtype=torch.bool)
            keep[us[taken & (gi == k)]] = False
        for k in torch.argsort(skipped).tolist():
            if int(skipped[k]) == stop:
                break
            label = ", ".join(gs[k].layers("out"))
            selection.floor[label] = selection.floor.get(label, 0) + skips[k]

    def ranked(gs: list[Group]) -> tuple[list[Group], torch.Tensor, torch.Tensor]:
        """The prunable units of ``gs`` by increasing score (ties by group, then unit): the
        groups that have some, and per unit its group's position among them and its index."""
        units = [(g, g.prunable.nonzero().flatten()) for g in gs]
        units = [(g, us) for g, us in units if us.numel()]
        if not units:
            return [], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        scores = torch.cat([all_scores[g.id][us] for g, us in units])
        gi = torch.repeat_interleave(torch.arange(len(units)),
                                     torch.tensor([len(us) for _, us in units], dtype=torch.long))
        order = torch.argsort(scores, stable=True)
        return [g for g, _ in units], gi[order], torch.cat([us for _, us in units])[order]

    if scope == "local":
        for g in candidates:
            size = int(budget.alone(g).sum())
            take(*ranked([g]), size - kept_count(size, sparsity), exact=False)
    else:
        take(*ranked(candidates), total - kept_count(total, sparsity), exact=True)
    selection.keep = kept
    if round_to > 1:
        for gid, keep in selection.keep.items():
            _round_kept(groups[gid], keep, all_scores[gid], round_to, floor)
    roles = {meta.entries(n).get("role") for n in graph.weight_nodes() if n.target in chosen}
    selection.masks = group_masks(graph, groups, selection.keep, roles | {"linear", "conv"})
    done = sum(m.numel() - int(torch.count_nonzero(m)) for n, m in selection.masks.items()
               if n in chosen)
    selection.params = (done, total)
    return selection


def _round_kept(g: Group, keep: torch.Tensor, scores: torch.Tensor, round_to: int, floor: int) -> None:
    """Move ``keep``'s count (in place) to the nearest multiple of ``round_to`` channels (see the
    module doc): drop the lowest-scoring kept prunable units or restore the highest-scoring
    removed ones, ties by unit index."""
    kept = int(keep.sum())
    if kept == g.size:
        return
    out = next((m for m in g.members if m.role == "out"), g.members[0])
    per_unit = max(int(out.counts[0]) if out.counts.numel() else 0, 1)
    step = round_to // math.gcd(round_to, per_unit)  # units per multiple of round_to channels
    low = step * max(1, -(-floor // step))
    target = min(g.size, max(low, step * math.floor(kept / step + 0.5)))
    droppable = (keep & g.prunable).nonzero().flatten()
    if kept - target > droppable.numel():  # chop must keep more than that: round up instead
        target = min(g.size, step * -(-kept // step))
    order = torch.argsort(scores, stable=True)  # lowest first
    if target < kept:
        lowest = order[(keep & g.prunable)[order]][: kept - target]
        keep[lowest] = False
    elif target > kept:
        highest = order[~keep[order]].flip(0)[: target - kept]
        keep[highest] = True


class _Budget:
    """The parameters of the chosen layers that units remove. ``removed`` counts, in ranking
    order, only those not removed yet (an entry in a removed row and a removed column counts
    once); ``alone`` counts a unit's slices as if nothing else went."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.params = params
        self.members: dict[int, list[Member]] = {}  # per group, its members among ``params``

    def _members(self, g: Group) -> list[Member]:
        found = self.members.get(g.id)
        if found is None:
            found = self.members[g.id] = [m for m in g.members if m.name in self.params]
        return found

    def alone(self, g: Group) -> torch.Tensor:
        """Per unit of ``g``: the parameters of its slices, as if nothing else went."""
        total = torch.zeros(g.size, dtype=torch.long)
        for m in self._members(g):
            p = self.params[m.name]
            total += m.counts * (p.numel() // max(p.shape[m.dim], 1))
        return total

    def removed(self, gs: list[Group], gi: torch.Tensor, us: torch.Tensor, taken: torch.Tensor,
                exact: bool) -> torch.Tensor:
        """Per ranked unit (``gs[gi[i]]``'s unit ``us[i]``): the parameters removing it removes
        after the ``taken`` units before it went (0 where not ``taken``); not ``exact``:
        :meth:`alone`'s count."""
        got = torch.zeros(len(gi), dtype=torch.long)
        if not exact:
            alone = [self.alone(g) for g in gs]
            sizes = torch.tensor([len(a) for a in alone], dtype=torch.long)
            got[taken] = torch.cat(alone)[(sizes.cumsum(0) - sizes)[gi[taken]] + us[taken]]
            return got
        # one event per taken unit and chosen member of its group, in ranking order, a unit's
        # members in its group's order: it removes its slices of that member's dim, times the
        # slices of the parameter's other dims still kept
        pairs = [m for g in gs for m in self._members(g)]
        if not pairs:
            return got
        per_group = torch.tensor([len(self._members(g)) for g in gs], dtype=torch.long)
        names = list(dict.fromkeys(m.name for m in pairs))
        index = {n: i for i, n in enumerate(names)}
        ndim = max(self.params[n].dim() for n in names)
        shapes = torch.tensor([list(self.params[n].shape) + [1] * (ndim - self.params[n].dim())
                               for n in names], dtype=torch.long)
        pair_param = torch.tensor([index[m.name] for m in pairs], dtype=torch.long)
        pair_dim = torch.tensor([m.dim for m in pairs], dtype=torch.long)
        lengths = torch.tensor([len(m.counts) for m in pairs], dtype=torch.long)
        counts = torch.cat([m.counts for m in pairs])
        units = taken.nonzero().flatten()
        reps = per_group[gi[units]]
        at = torch.repeat_interleave(units, reps)  # each event's position in the ranking
        j = torch.arange(len(at)) - torch.repeat_interleave(reps.cumsum(0) - reps, reps)
        pair = (per_group.cumsum(0) - per_group)[gi[at]] + j
        param, dim = pair_param[pair], pair_dim[pair]
        count = counts[(lengths.cumsum(0) - lengths)[pair] + us[at]]
        # per parameter (events sorted by it, in order), the slices of each dim removed before
        by = torch.argsort(param, stable=True)
        param, dim, count = param[by], dim[by], count[by]
        _, runs = torch.unique_consecutive(param, return_counts=True)
        factor = torch.ones_like(count)
        for d in range(ndim):
            here = torch.where(dim == d, count, 0)
            before = here.cumsum(0) - here
            before -= torch.repeat_interleave(before[runs.cumsum(0) - runs], runs)
            factor *= torch.where(dim == d, 1, shapes[param, d] - before)
        removed = torch.empty_like(count)
        removed[by] = count * factor
        return got.index_add_(0, at, removed)
