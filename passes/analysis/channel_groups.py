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
  ``shrink(graph)`` outside the pass manager; the manager drops it itself). It also holds the
  walk it came from (``ChannelGroups.flow``, fx nodes, not copied): ``shrink`` reuses it through
  :func:`current_flow` while the graph still has the very nodes walked (``mask`` keeps the
  groups, and its mask nodes change no channel), instead of walking the graph again;
- ``node.meta["chop"]["channel_groups"]`` on every member weight node: ``{dim: LongTensor}`` giving
  each index's group id (-1: in no group), so the pass manager can match ``requires``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch.fx import Node

from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import mask_of
from chop.passes.analysis.flow import Flow, trace_channels
from chop.passes.analysis.flow.rule import find_tensor, rank
from chop.pipeline.pass_base import Context, Pass, PassResult

KEY = "channel_groups"


@dataclass
class Member:
    """One parameter (or buffer) dim of a group: ``index[u]`` are the indices channel ``u`` owns,
    stored flat: ``flat`` holds them channel after channel, ``counts[u]`` how many are ``u``'s."""

    name: str
    dim: int
    kind: str  # "parameter" or "buffer"
    role: str  # "out" (rows of a producer), "in" (columns of a consumer), "channel" (per-channel)
    flat: torch.Tensor = field(repr=False)
    counts: torch.Tensor = field(repr=False)
    _index: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def index(self) -> list[torch.Tensor]:
        """Per channel, the indices it owns (ascending)."""
        if self._index is None:
            self._index = list(torch.split(self.flat, self.counts.tolist()))
        return self._index

    @index.setter
    def index(self, pieces: list[torch.Tensor]) -> None:
        self.flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        self.counts = torch.tensor([len(p) for p in pieces], dtype=torch.long)
        self._index = list(pieces)

    @property
    def single(self) -> bool:
        """Whether every channel owns exactly one index (then ``flat[u]`` is channel u's)."""
        return bool((self.counts == 1).all())

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """The indices the channels ``units`` own, concatenated (in the order given)."""
        if self.single:
            return self.flat[units]
        starts = self.counts.cumsum(0) - self.counts
        return torch.cat([self.flat[s:s + c] for s, c in
                          zip(starts[units].tolist(), self.counts[units].tolist())]
                         or [self.flat[:0]])


@dataclass
class Group:
    """Channels that live in the same coupled layers; ``size`` of them, removable one by one."""

    id: int
    kind: str  # "channel" or "head"
    members: list[Member]
    units: list[int]  # unit id (component of the coupling graph) of each channel
    blocked: list[str | None]  # why channel u cannot be removed, or None (read-only)
    _prunable: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> torch.Tensor:
        """Bool, one per channel: True where the channel may be removed."""
        if self._prunable is None or len(self._prunable) != len(self.blocked):
            self._prunable = torch.tensor([b is None for b in self.blocked], dtype=torch.bool)
        return self._prunable.clone()

    def layers(self, role: str | None = None) -> list[str]:
        """Parameter names of the members (optionally of one role)."""
        return [m.name for m in self.members if role is None or m.role == role]


@dataclass
class ChannelGroups:
    """The result of :func:`channel_groups`: plain data (no fx nodes), safe to copy. ``flow``,
    the walk the groups came from, is kept for :func:`current_flow` (shrink reuses it on the
    same graph) and left out of copies and pickles."""

    groups: list[Group]
    unit_of: torch.Tensor = field(repr=False)  # unit id of each atom (channel position)
    signature: tuple = field(default=(), repr=False)  # what the groups were computed from
    flow: Flow | None = field(default=None, repr=False, compare=False)
    nodes: tuple = field(default=(), repr=False, compare=False)  # the nodes ``flow`` walked

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, group_id: int) -> Group:
        return self.groups[group_id]

    def _plain(self) -> dict:
        state = {**self.__dict__, "flow": None, "nodes": ()}
        state.pop("_by_name", None)
        return state

    def __getstate__(self) -> dict:
        """For pickle: the signature's ops by name (torch's op objects do not pickle), so an
        unpickled copy no longer matches a live graph's signature (:func:`stored_channel_groups`
        recomputes)."""
        state = self._plain()
        if state["signature"]:
            ops, shapes = state["signature"]
            state["signature"] = (tuple(str(op) for op in ops), shapes)
        return state

    def __deepcopy__(self, memo: dict) -> ChannelGroups:
        twin = ChannelGroups.__new__(ChannelGroups)
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self._plain(), memo))
        return twin

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
        """The groups parameter ``name`` is a member of (optionally with a given role), in
        group order; from an index by name, built at the first call (``mask`` asks for every
        weight's groups) and again should ``groups`` be replaced or resized."""
        index = self.__dict__.get("_by_name")
        if index is None or index[0] is not self.groups or index[1] != len(self.groups):
            by_name: dict[str, list[tuple[Group, set[str]]]] = defaultdict(list)
            for g in self.groups:
                roles: dict[str, set[str]] = defaultdict(set)
                for m in g.members:
                    roles[m.name].add(m.role)
                for member, its in roles.items():
                    by_name[member].append((g, its))
            index = self.__dict__["_by_name"] = (self.groups, len(self.groups), by_name)
        return [g for g, roles in index[2].get(name, ()) if role is None or role in roles]


def _walked(graph: Graph) -> tuple[Node, ...]:
    """The nodes a walk depends on (mask nodes aside), to tell whether a flow is still this
    graph's."""
    return tuple(n for n in graph.module.graph.nodes
                 if n.op == "call_function" and mask_of(n) is None)


def _signature(graph: Graph, names: set[str], nodes: tuple[Node, ...] | None = None) -> tuple:
    """The graph's ops (mask nodes aside) and the shapes of the member tensors ``names``: cheap
    to compare, and changed by anything that changes the groups (shrink, sparse, a new op)."""
    ops = tuple(n.target for n in (_walked(graph) if nodes is None else nodes))
    found = {name: find_tensor(graph, name) for name in names}
    return ops, {name: None if t is None else tuple(t.shape) for name, t in found.items()}


def channel_groups(graph: Graph, flow: Flow | None = None) -> ChannelGroups:
    """Find the channel groups of ``graph`` (no side effects; see :class:`ChannelGroups`);
    ``flow``: ``trace_channels(graph)`` if the caller has it already."""
    flow = trace_channels(graph) if flow is None else flow
    # units are numbered in graph order: by their smallest atom
    _, unit_of = torch.unique(flow.labels, return_inverse=True)
    units = int(unit_of.max()) + 1 if unit_of.numel() else 0
    unit_blocked = _blocked(flow, unit_of, units)
    unit_head = set(unit_of[torch.tensor(sorted(flow.heads), dtype=torch.long)].tolist())
    # every (unit, member, index) triple, members numbered in sorted order
    keys = sorted(flow.members)
    triples = _owned([flow.members[key].atoms for key in keys], unit_of)
    if triples is None:
        return ChannelGroups([], unit_of, _signature(graph, set()), flow, _walked(graph))
    unit, k, index = triples
    group_of, order_in, members_of = _group_units(unit, k, index, units)
    groups = []
    heads_of = torch.zeros(units, dtype=torch.bool)
    if unit_head:
        heads_of[torch.tensor(sorted(unit_head))] = True
    role_order = {"out": 0, "channel": 1, "in": 2}
    # the triples by group, then member, then channel, then index
    size = int(order_in.max()) + 1
    by = torch.argsort((group_of[unit] * len(keys) + k) * size + order_in[unit], stable=True)
    unit, k, index = unit[by], k[by], index[by]
    gk = group_of[unit] * len(keys) + k
    pairs, counts = torch.unique_consecutive(gk, return_counts=True)
    flats = torch.split(index, counts.tolist())
    # per pair, the indices each unit owns: a unit's are consecutive (sorted by order_in),
    # so its runs of (pair, unit), split by pair
    runs, per_unit = torch.unique_consecutive(gk * units + unit, return_counts=True)
    _, runs_per_pair = torch.unique_consecutive(runs // units, return_counts=True)
    owns = torch.split(per_unit, runs_per_pair.tolist())
    members: dict[int, list[Member]] = defaultdict(list)
    for pair, flat, owned in zip(pairs.tolist(), flats, owns):
        gid, key = divmod(pair, len(keys))
        record = flow.members[keys[key]]
        members[gid].append(Member(record.name, record.dim, record.kind, record.role, flat, owned))
    for gid, us in enumerate(members_of):
        ms = sorted(members[gid], key=lambda m: role_order[m.role])  # stable: keys sorted
        kind = "head" if bool(heads_of[us].any()) else "channel"
        ulist = us.tolist()
        groups.append(Group(gid, kind, ms, ulist, [unit_blocked.get(u) for u in ulist]))
    names = {name for name, _ in flow.members}
    nodes = _walked(graph)
    return ChannelGroups(groups, unit_of, _signature(graph, names, nodes), flow, nodes)


def _blocked(flow: Flow, unit_of: torch.Tensor, units: int) -> dict[int, str]:
    """Per blocked unit, its reason: the one no rule could lift (an output, a normalisation)
    first, then the first atom's in graph order."""
    if not flow.blocked:
        return {}
    reasons = list(flow.blocked.values())
    ranks = {r: rank(r) for r in set(reasons)}
    atoms = torch.tensor(list(flow.blocked), dtype=torch.long)
    key = torch.tensor([ranks[r] for r in reasons], dtype=torch.long) * flow.count + atoms
    best = torch.full((units,), -1, dtype=torch.long)
    best.scatter_reduce_(0, unit_of[atoms], key, "amin", include_self=False)
    found = (best >= 0).nonzero().flatten()
    return dict(zip(found.tolist(), (flow.blocked[a] for a in (best[found] % flow.count).tolist())))


def _owned(atoms: list[torch.Tensor], unit_of: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(unit, member, index)`` of every member index that belongs to a unit (``atoms``: per
    member, each index's atom, -1 for none), in member then index order; None if there is
    none. All members at once: there are hundreds."""
    if not atoms:
        return None
    lengths = torch.tensor([len(a) for a in atoms], dtype=torch.long)
    flat = torch.cat(atoms)
    k = torch.repeat_interleave(torch.arange(len(atoms)), lengths)
    index = torch.arange(len(flat)) - (lengths.cumsum(0) - lengths)[k]
    known = flat >= 0
    if not bool(known.any()):
        return None
    return unit_of[flat[known]], k[known], index[known]


def _same_rows(row: torch.Tensor, col: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor,
               starts: torch.Tensor) -> torch.Tensor:
    """Label ragged rows (row ``row[i]`` holds ``value[i]`` at column ``col[i]``; row r spans
    ``starts[r]`` and ``lengths[r]`` entries) so that equal rows get equal labels: by a hash of
    each row, checked exactly against the first row of its label (a collision falls back to
    comparing whole rows)."""
    weights = torch.randint(1, 1 << 20, (int(lengths.max()),), generator=torch.Generator().manual_seed(0))
    hashed = torch.zeros(len(lengths), dtype=torch.long).index_add_(0, row, (value + 1) * weights[col])
    _, label = torch.unique(lengths * (1 << 42) + hashed, return_inverse=True)
    first = torch.full((int(label.max()) + 1,), len(lengths), dtype=torch.long)
    first.scatter_reduce_(0, label, torch.arange(len(lengths)), "amin")
    same = value == value[starts[first[label[row]]] + col]
    if bool(same.all()):
        return label
    table = torch.full((len(lengths), int(lengths.max())), -1, dtype=torch.long)
    table[row, col] = value
    return torch.unique(table, dim=0, return_inverse=True)[1]


def _group_units(unit: torch.Tensor, k: torch.Tensor, index: torch.Tensor, units: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gather the units that own indices of the same members into groups: per unit its group
    (-1: none) and its position in the group, and each group's units in order. Groups are
    numbered by their first unit; a group's units are ordered by the first index they own in its
    first member (indices of different units never coincide in one member)."""
    # each unit's signature: the sorted set of members it owns indices of
    pair = torch.unique(unit * (int(k.max()) + 1) + k)  # sorted by unit, then member
    pu, pk = pair // (int(k.max()) + 1), pair % (int(k.max()) + 1)
    owners, row, per_unit = torch.unique_consecutive(pu, return_inverse=True, return_counts=True)
    starts = per_unit.cumsum(0) - per_unit
    col = torch.arange(len(pu)) - starts[row]
    signature = _same_rows(row, col, pk, per_unit, starts)
    first_k = pk[starts]
    # number groups by their first unit (owners are ascending)
    firsts = torch.full((int(signature.max()) + 1,), len(owners), dtype=torch.long)
    firsts.scatter_reduce_(0, signature, torch.arange(len(owners)), "amin")
    renumber = torch.empty_like(firsts)
    renumber[torch.argsort(firsts)] = torch.arange(len(firsts))
    group_of = torch.full((units,), -1, dtype=torch.long)
    group_of[owners] = renumber[signature]
    # within a group: by the first index each unit owns in the group's first member
    row_of = torch.full((units,), -1, dtype=torch.long)
    row_of[owners] = torch.arange(len(owners))
    mine = k == first_k[row_of[unit]]
    first_index = torch.full((units,), -1, dtype=torch.long)
    first_index.scatter_reduce_(0, unit[mine], index[mine], "amin", include_self=False)
    order = torch.argsort(group_of[owners] * (int(index.max()) + 1) + first_index[owners], stable=True)
    ordered = owners[order]
    sizes = torch.bincount(group_of[ordered], minlength=len(firsts))
    members_of = list(torch.split(ordered, sizes.tolist()))
    order_in = torch.zeros(units, dtype=torch.long)
    for us in members_of:
        order_in[us] = torch.arange(len(us))
    return group_of, order_in, members_of


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
            ids[m.flat] = g.id
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
    if flow is not None and found.unit_of.numel() != flow.count:
        return None
    return found if found.signature == _signature(graph, set(found.signature[1])) else None


def current_flow(graph: Graph) -> tuple[Flow, ChannelGroups] | None:
    """The walk the stored groups came from, with the groups, if both still hold for ``graph``:
    the groups are current and the graph has the very nodes the walk visited (mask nodes
    aside: inserting or folding masks changes no channel); else None."""
    found = graph.module.meta.get("chop", {}).get(KEY)
    if not isinstance(found, ChannelGroups) or found.flow is None:
        return None
    nodes = _walked(graph)
    if len(nodes) != len(found.nodes) or any(a is not b for a, b in zip(nodes, found.nodes)):
        return None
    if found.signature != _signature(graph, set(found.signature[1]), nodes):
        return None
    return found.flow, found


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
