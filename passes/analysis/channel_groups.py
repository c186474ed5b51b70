"""``channel-groups``: find the groups of channels that must be removed together.

Built on :func:`chop.passes.analysis.flow.trace_channels`. A *unit* is one removable channel (or
one attention head): a connected component of the coupling graph, i.e. every position, in every
coupled layer, that must go when it goes. A :class:`Group` gathers the units that touch the same
parameters — e.g. the 64 output channels of ``conv1`` together with ``bn1`` and the input columns
of ``conv2`` — so a group is a set of coupled layers with ``size`` channels, and each
:class:`Member` maps each of those channels to the indices it owns in one parameter dim
(a block of columns for a flatten into a linear, ``head_dim`` rows for a head).

Units that touch something chop cannot shrink are *unprunable*, with the reason
(``Group.blocked``: the most fundamental one — the channels are model outputs, then a
normalisation spans them, then the first in graph order); ``ChannelGroups.unprunable()`` lists
them per group.

Where the result lives:

- ``graph.module.meta["chop"]["channel_groups"]``: the :class:`ChannelGroups` object (graph-level,
  plain data that survives ``Graph.copy()``; read it with :func:`stored_channel_groups`, which
  recomputes it when the graph's ops or member shapes changed since, e.g. after a plain
  ``shrink(graph)`` outside the pass manager; the manager drops it itself);
- ``node.meta["chop"]["channel_groups"]`` on every member weight node: ``{dim: LongTensor}`` giving
  each index's group id (-1: in no group), so the pass manager can match ``requires``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import networkx as nx
import torch

from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import mask_of
from chop.passes.analysis.flow import Flow, trace_channels
from chop.passes.analysis.flow.rule import rank
from chop.pipeline.pass_base import Context, Pass, PassResult

KEY = "channel_groups"


@dataclass
class Member:
    """One parameter (or buffer) dim of a group: ``index[u]`` are the indices channel ``u`` owns."""

    name: str
    dim: int
    kind: str  # "parameter" or "buffer"
    role: str  # "out" (rows of a producer), "in" (columns of a consumer), "channel" (per-channel)
    index: list[torch.Tensor]


@dataclass
class Group:
    """Channels that live in the same coupled layers; ``size`` of them, removable one by one."""

    id: int
    kind: str  # "channel" or "head"
    members: list[Member]
    units: list[int]  # unit id (component of the coupling graph) of each channel
    blocked: list[str | None]  # why channel u cannot be removed, or None

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> torch.Tensor:
        """Bool, one per channel: True where the channel may be removed."""
        return torch.tensor([b is None for b in self.blocked], dtype=torch.bool)

    def layers(self, role: str | None = None) -> list[str]:
        """Parameter names of the members (optionally of one role)."""
        return [m.name for m in self.members if role is None or m.role == role]


@dataclass
class ChannelGroups:
    """The result of :func:`channel_groups`: plain data (no fx nodes), safe to copy."""

    groups: list[Group]
    unit_of: torch.Tensor = field(repr=False)  # unit id of each atom (channel position)
    signature: tuple = field(default=(), repr=False)  # what the groups were computed from

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, group_id: int) -> Group:
        return self.groups[group_id]

    def unprunable(self) -> list[tuple[int, int, str]]:
        """``(group id, channels, reason)`` for every reason some channels cannot be removed."""
        out = []
        for g in self.groups:
            counts: dict[str, int] = defaultdict(int)
            for reason in g.blocked:
                if reason is not None:
                    counts[reason] += 1
            out += [(g.id, n, reason) for reason, n in counts.items()]
        return out

    def of(self, name: str, role: str | None = None) -> list[Group]:
        """The groups parameter ``name`` is a member of (optionally with a given role)."""
        return [g for g in self.groups
                if any(m.name == name and (role is None or m.role == role) for m in g.members)]


def _signature(graph: Graph, names: set[str]) -> tuple:
    """The graph's ops (mask nodes aside) and the shapes of the member tensors ``names``: cheap
    to compare, and changed by anything that changes the groups (shrink, sparse, a new op)."""
    ops = tuple(n.target for n in graph.module.graph.nodes
                if n.op == "call_function" and mask_of(n) is None)
    tensors = {**dict(graph.module.named_buffers()), **dict(graph.module.named_parameters())}
    return ops, {name: tuple(tensors[name].shape) if name in tensors else None for name in names}


def channel_groups(graph: Graph, flow: Flow | None = None) -> ChannelGroups:
    """Find the channel groups of ``graph`` (no side effects; see :class:`ChannelGroups`);
    ``flow``: ``trace_channels(graph)`` if the caller has it already."""
    flow = trace_channels(graph) if flow is None else flow
    labels = [-1] * flow.coupling.number_of_nodes()
    unit_blocked: dict[int, str | None] = {}
    unit_head: set[int] = set()
    for u, component in enumerate(sorted(nx.connected_components(flow.coupling), key=min)):
        for a in component:
            labels[a] = u
    # the reason no rule could lift (an output, a normalisation) first, then graph order
    for u, (_, a) in sorted((labels[a], (rank(reason), a)) for a, reason in flow.blocked.items()):
        unit_blocked.setdefault(u, flow.blocked[a])
    unit_head.update(labels[a] for a in flow.heads)
    unit_of = torch.tensor(labels, dtype=torch.long)
    # the indices each unit owns in each member dim, in index order: one sort per member
    owned: dict[int, dict[tuple[str, int], torch.Tensor]] = defaultdict(dict)
    first: dict[int, dict[tuple[str, int], int]] = defaultdict(dict)
    for key, record in flow.members.items():
        index = (record.atoms >= 0).nonzero().flatten()
        if not index.numel():
            continue
        units = unit_of[record.atoms[index]]
        units, order = torch.sort(units, stable=True)
        index = index[order]
        ids, counts = torch.unique_consecutive(units, return_counts=True)
        firsts = index[counts.cumsum(0) - counts].tolist()
        for u, piece, f in zip(ids.tolist(), torch.split(index, counts.tolist()), firsts):
            owned[u][key] = piece.clone()
            first[u][key] = f
    by_signature: dict[tuple, list[int]] = {}
    for u in sorted(owned):  # units are numbered in graph order
        by_signature.setdefault(tuple(sorted(owned[u])), []).append(u)
    groups = []
    order = {"out": 0, "channel": 1, "in": 2}
    for signature, units in by_signature.items():
        units.sort(key=lambda u: [first[u][k] for k in signature])
        members = [
            Member(name, dim, flow.members[name, dim].kind, flow.members[name, dim].role,
                   [owned[u][name, dim] for u in units])
            for name, dim in signature
        ]
        members.sort(key=lambda m: order[m.role])
        kind = "head" if any(u in unit_head for u in units) else "channel"
        groups.append(Group(len(groups), kind, members, units, [unit_blocked.get(u) for u in units]))
    names = {name for name, _ in flow.members}
    return ChannelGroups(groups, unit_of, _signature(graph, names))


def store(graph: Graph, groups: ChannelGroups) -> None:
    """Record ``groups`` on the graph module and each member weight node (see the module doc)."""
    graph.module.meta.setdefault("chop", {})[KEY] = groups
    per_param: dict[str, dict[int, torch.Tensor]] = {}
    params = dict(graph.module.named_parameters())
    for g in groups:
        for m in g.members:
            if m.kind != "parameter":
                continue
            ids = per_param.setdefault(m.name, {}).setdefault(
                m.dim, torch.full((params[m.name].shape[m.dim],), -1, dtype=torch.long))
            if m.index:
                ids[torch.cat(m.index)] = g.id
    for node in graph.weight_nodes():
        entry = meta.entries(node)
        entry.pop(KEY, None)
        if node.target in per_param:
            entry[KEY] = per_param[node.target]


def current_channel_groups(graph: Graph, flow: Flow | None = None) -> ChannelGroups | None:
    """The stored :class:`ChannelGroups` if still current (and, given ``flow``, computed over
    as many atoms as it has), else None; nothing is computed or stored."""
    found = graph.module.meta.get("chop", {}).get(KEY)
    if not isinstance(found, ChannelGroups):
        return None
    if flow is not None and found.unit_of.numel() != flow.coupling.number_of_nodes():
        return None
    return found if found.signature == _signature(graph, set(found.signature[1])) else None


def stored_channel_groups(graph: Graph) -> ChannelGroups:
    """The stored :class:`ChannelGroups` if still current, else freshly computed (and stored)."""
    found = current_channel_groups(graph)
    if found is not None:
        return found
    groups = channel_groups(graph)
    store(graph, groups)
    return groups


@dataclass(frozen=True)
class ChannelGroupsPass(Pass):
    """Find the channels (and attention heads) that must be removed together."""

    name: ClassVar[str] = "channel-groups"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    provides: ClassVar[tuple[str, ...]] = (KEY,)

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        groups = channel_groups(graph)
        store(graph, groups)
        unprunable = groups.unprunable()
        return PassResult(modified=False, info={
            "groups": len(groups),
            "channels": sum(g.size for g in groups),
            "prunable": sum(int(g.prunable.sum()) for g in groups),
            "heads": sum(g.size for g in groups if g.kind == "head"),
            "unprunable": [{"group": g, "channels": n, "reason": r} for g, n, r in unprunable],
        })
