"""Structured selection over channel groups: score channels and heads, turn keep decisions into
per-parameter masks, and check that a granularity fits the model.

These are the building blocks of ``mask{granularity=channel|head}``::

    groups = stored_channel_groups(graph)
    require_granularity(groups, [n.target for n in nodes], "channel")
    scores = group_scores(graph, groups)                       # {group id: score per channel}
    keep = {gid: s >= s.median() for gid, s in scores.items()}  # any rule
    for name, mask in group_masks(graph, groups, keep).items():
        insert_mask(graph, graph.weight_node(name), mask)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from chop.errors import GranularityError, MissingMetadataError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.passes.analysis.channel_groups import ChannelGroups, Group

Granularity = Literal["channel", "head"]


def matches(group: Group, granularity: Granularity) -> bool:
    """Whether ``group`` is pruned under ``granularity`` (heads are head groups only)."""
    return group.kind == granularity


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
    for g in chosen:
        score, found = torch.zeros(g.size, dtype=torch.float64), False
        for m in g.members:
            value = meta.entries(nodes[m.name]).get(key) if m.name in nodes else None
            if value is None:
                continue
            found = True
            per_index = value.detach().double().movedim(m.dim, 0).reshape(value.shape[m.dim], -1).sum(1)
            score += torch.stack([per_index[i].sum() for i in m.index])
        if found:
            out[g.id] = score
    if chosen and not out:
        raise MissingMetadataError(
            f"no channel group of {graph.name} has a {key!r} entry; run a criterion (snip, "
            "magnitude, random) before scoring groups")
    return out


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
        dropped = (~decision).nonzero().flatten().tolist()
        for m in g.members:
            if m.kind != "parameter" or role_of.get(m.name) not in roles:
                continue
            mask = masks.setdefault(m.name, torch.ones_like(params[m.name], dtype=torch.bool))
            for u in dropped:
                mask.index_fill_(m.dim, m.index[u], False)
    return masks


def require_granularity(groups: ChannelGroups, names: Iterable[str], granularity: Granularity) -> None:
    """Raise :class:`GranularityError` naming the first layer in ``names`` that no prunable group
    of this granularity covers (e.g. ``granularity=head`` on a CNN, or the output layer)."""
    if granularity not in ("channel", "head"):
        raise GranularityError(f"unknown structured granularity {granularity!r}; use channel or head")
    names = list(names)
    if granularity == "head" and not any(g.kind == "head" for g in groups):
        raise GranularityError(
            f"granularity=head: the model has no attention heads chop can prune (it recognises "
            f"scaled_dot_product_attention fed by per-head views of linear outputs); layer "
            f"{names[0] if names else '?'} cannot be pruned by heads. Use granularity=channel "
            "or element")
    for name in names:
        mine = [g for g in groups.of(name) if matches(g, granularity)]
        if any(bool(g.prunable.any()) for g in mine):
            continue
        others = [g for g in groups.of(name) if g.kind != granularity and bool(g.prunable.any())]
        reasons = sorted({r for g in mine for r in g.blocked if r})
        why = (f"its {granularity}s cannot be removed: {reasons[0]}" if reasons else
               f"it is in no {granularity} group")
        hint = (f"; it can be pruned with granularity={others[0].kind}" if others else "")
        raise GranularityError(
            f"granularity={granularity}: layer {name} cannot be pruned this way: {why}{hint}. "
            "Exclude it (exclude='...') or use granularity=element")
