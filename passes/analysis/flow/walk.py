"""The walk: visit every node once in graph order and keep the books (atoms, coupling, members,
consumers, heads, blocking); each op's meaning comes from its rule (see the package doc)."""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch.fx import Node

import chop.passes.analysis.flow.rules  # noqa: F401  (registers every rule)
from chop.ir.graph import Graph
from chop.ir.masks import mask_of
from chop.passes.analysis.flow.rule import (
    Consumer,
    Step,
    Tag,
    Unsupported,
    aten,
    packet,
    rank,
    rule_for,
)

log = logging.getLogger("chop")
_PASSING = (aten.expand, aten.alias, aten.clone, aten.contiguous, aten._to_copy, aten.to)


@dataclass
class MemberRecord:
    """A parameter (or buffer) dim indexed by channels: ``atoms[i]`` is index i's atom (-1: none)."""

    name: str
    dim: int
    kind: str  # "parameter" or "buffer"
    role: str  # "out" (a producer's rows), "in" (a consumer's columns), "channel" (per-channel)
    atoms: torch.Tensor


@dataclass
class Flow:
    """The result of :func:`trace_channels`. ``steps`` holds every node a rule visited (a tuple
    result's step is its getitem nodes'); ``parts`` the tags of tuple results, per item.
    ``edges`` (``[2, E]``) are the joins between the ``count`` atoms; ``labels[a]`` is the
    smallest atom of ``a``'s connected component (its unit)."""

    tags: dict[Node, Tag]
    steps: dict[Node, Step]
    consumers: list[Consumer]
    members: dict[tuple[str, int], MemberRecord]
    count: int
    edges: torch.Tensor
    labels: torch.Tensor
    blocked: dict[int, str]
    heads: set[int]
    parts: dict[Node, list[tuple[Tag | None, Step | None]]]

    @property
    def coupling(self) -> nx.Graph:
        """The joins as a networkx graph (one node per atom), for inspection and tests."""
        graph = nx.Graph()
        graph.add_nodes_from(range(self.count))
        graph.add_edges_from(self.edges.t().tolist())
        return graph


def nodes_in(value: Any) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg(value, out.append)
    return out


class Walk:
    """The bookkeeping rules write through while :func:`trace_channels` walks a graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.params = dict(graph.module.named_parameters())
        self.buffers = dict(graph.module.named_buffers())
        self.tags: dict[Node, Tag] = {}
        self.steps: dict[Node, Step] = {}
        self.parts: dict[Node, list[tuple[Tag | None, Step | None]]] = {}
        self.consumers: list[Consumer] = []
        self.members: dict[tuple[str, int], MemberRecord] = {}
        self.edges: list[torch.Tensor] = []  # [2, k] pieces: the joins
        self.blocked: dict[int, str] = {}
        self.heads: set[int] = set()
        self.spaces: dict[tuple[str, int], torch.Tensor] = {}
        self.uses: dict[str, set[Node]] = {}
        self.fixed: dict[tuple[str, int], str] = {}  # weight dims read along untracked channels
        self.boxes: list[tuple[torch.Tensor, tuple[int, ...] | None]] = []
        self.current: Node | None = None
        self.count = 0

    # -- atoms, members, blocking -------------------------------------------------------------

    def new_atoms(self, n: int, origin: str) -> torch.Tensor:
        """``n`` fresh atoms (``origin`` says where they come from, for debugging)."""
        atoms = torch.arange(self.count, self.count + n)
        log.debug("channel-groups: atoms %d..%d: %s", self.count, self.count + n - 1, origin)
        self.count += n
        return atoms

    def space(self, name: str, dim: int) -> torch.Tensor:
        """The atoms of a weight's output dim (shared by every use of the weight)."""
        if (name, dim) not in self.spaces:
            size = self.params[name].shape[dim]
            self.spaces[name, dim] = self.new_atoms(size, f"{name}[dim {dim}]")
        return self.spaces[name, dim]

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Atoms at the same position of ``a`` and ``b`` must be removed together."""
        a, b = a.flatten(), b.flatten()
        n = min(len(a), len(b))
        a, b = a[:n], b[:n]
        differ = a != b
        if bool(differ.any()):
            self.edges.append(torch.stack([a[differ], b[differ]]))

    def join_rows(self, atoms: torch.Tensor, dim: int) -> None:
        """Each index along ``dim`` goes as one unit (a head, a group of channels)."""
        rows = atoms.movedim(dim, 0).reshape(atoms.shape[dim], -1)
        self.join(rows[:, :1].expand_as(rows), rows)

    def box(self, atoms: torch.Tensor, axes: tuple[int, ...] | None = None) -> None:
        """The positions of a multi-dim tag must go as whole hyperplanes along one of ``axes``
        (default: any axis), so that the kept ones form a box (a view can still spell their
        sizes). Settled after the walk, when every op had its say on the units: if no allowed
        axis fits yet, each index along the first one is joined into one unit."""
        self.boxes.append((atoms, axes))

    def member(self, name: str | None, dim: int, atoms: torch.Tensor, role: str,
               index: torch.Tensor | None = None) -> None:
        """Record that ``name``'s ``dim`` is indexed by ``atoms`` (at ``index``, default all)."""
        if name is None:
            return
        if self.current is not None:
            self.uses.setdefault(name, set()).add(self.current)
        kind = "parameter" if name in self.params else "buffer"
        tensor = self.params.get(name, self.buffers.get(name))
        key = (name, dim)
        record = self.members.get(key)
        if record is None:
            if index is None and atoms.shape == (tensor.shape[dim],):  # the whole dim, first seen
                self.members[key] = MemberRecord(name, dim, kind, role,
                                                 atoms.to(torch.long, copy=True))
                return
            record = self.members[key] = MemberRecord(
                name, dim, kind, role, torch.full((tensor.shape[dim],), -1, dtype=torch.long))
        index = torch.arange(len(atoms)) if index is None else index
        old = record.atoms[index]
        seen = old >= 0
        self.join(old[seen], atoms[seen])
        record.atoms[index[~seen]] = atoms[~seen]

    def untracked(self, name: str, dim: int, x: Any) -> None:
        """``name``'s ``dim`` meets ``x``'s channels, which the walk does not track (a model
        input, an op it cannot follow): should another use of the weight (a layer applied
        twice) make that dim a member, its indices still cannot go (see :meth:`check_uses`)."""
        node = self.current.name if self.current is not None else "?"
        where = x.name if isinstance(x, Node) else "a constant"
        self.fixed.setdefault((name, dim), f"{name} (dim {dim}) is also applied by {node} to "
                                            f"{where}, whose channels cannot be removed")

    def block(self, atoms: torch.Tensor, reason: str) -> None:
        for a in atoms.flatten().unique().tolist():
            if a not in self.blocked or rank(reason) < rank(self.blocked[a]):
                self.blocked[int(a)] = reason

    def block_inputs(self, node: Node, reason: str) -> None:
        for arg in nodes_in((node.args, node.kwargs)):
            if arg in self.tags:
                self.block(self.tags[arg].atoms, reason)
        log.debug("channel-groups: %s", reason)

    def set(self, node: Node, dims: tuple[int, ...], atoms: torch.Tensor, step: Step,
            folded: tuple[int, ...] = ()) -> None:
        self.tags[node] = Tag(tuple(dims), atoms, tuple(folded))
        self.steps[node] = step

    def same(self, node: Node, step: Step) -> None:
        """``node`` carries its first operand's channels unchanged."""
        tag = self.first(node)
        self.set(node, tag.dims, tag.atoms, step, tag.folded)

    # -- lookups for rules ---------------------------------------------------------------------

    def param_of(self, arg: Any) -> str | None:
        """The parameter or buffer ``arg`` reads (through a mask node), else None."""
        if not isinstance(arg, Node):
            return None
        if arg.op == "get_attr" and (arg.target in self.params or arg.target in self.buffers):
            return arg.target
        return mask_of(arg)

    def param_through(self, arg: Any) -> tuple[str | None, int]:
        """The parameter or buffer ``arg`` reads, directly or through ``expand``, a copy or a
        cast, and how many leading dims ``arg`` has more than it; ``(None, 0)`` otherwise."""
        ndim = len(arg.meta["val"].shape) if isinstance(arg, Node) and "val" in arg.meta else 0
        chain = []
        while (isinstance(arg, Node) and arg.op == "call_function" and mask_of(arg) is None
               and packet(arg) in _PASSING):
            chain.append(arg)
            arg = arg.args[0]
        name = self.param_of(arg)
        if name is None:
            return None, 0
        self.uses.setdefault(name, set()).update(chain)  # read on the way (if it is a member)
        return name, ndim - self.params.get(name, self.buffers.get(name)).dim()

    def tag(self, arg: Any) -> Tag | None:
        return self.tags.get(arg) if isinstance(arg, Node) else None

    def first(self, node: Node) -> Tag:
        """The tag of ``node``'s first operand, the one whose channels the op moves."""
        tag = self.tag(node.args[0])
        if tag is None:
            raise Unsupported("carries channels in an operand other than the first")
        return tag

    def single(self, arg: Any, dim: int) -> Tag | None:
        """The tag of ``arg`` if it carries channels only along ``dim`` (None if untracked)."""
        tag = self.tag(arg)
        if tag is not None and tag.dims != (dim,):
            raise Unsupported(f"expects channels along dim {dim} only, found them along {tag.dims}")
        return tag

    # -- the walk -----------------------------------------------------------------------------

    def run(self) -> Flow:
        for node in self.graph.module.graph.nodes:
            if node.op == "output":
                for arg in nodes_in(node.args):
                    if arg in self.tags:
                        self.block(self.tags[arg].atoms,
                                   f"{arg.name} reaches the model output (its channels are "
                                   "outputs of the model)")
            elif node.op == "call_module":
                if any(a in self.tags for a in nodes_in((node.args, node.kwargs))):
                    self.block_inputs(node, f"{node.name}: call_module {node.target} is opaque")
            elif node.op == "call_function":
                self.visit(node)
        self.check_uses()
        labels = self.settle_boxes()
        edges = torch.cat(self.edges, 1) if self.edges else torch.zeros(2, 0, dtype=torch.long)
        return Flow(self.tags, self.steps, self.consumers, self.members, self.count, edges,
                    labels, self.blocked, self.heads, self.parts)

    def visit(self, node: Node) -> None:
        rule = rule_for(node)
        tracked = any(a in self.tags or a in self.parts for a in nodes_in((node.args, node.kwargs)))
        if not tracked and not (rule is not None and rule.creates):
            return
        if not node.users and not _effectful(node):
            return  # dead code (an unused attention-weights average): it changes nothing
        self.current = node
        try:
            if node.target is operator.getitem:
                self.getitem(node)
            elif rule is None:
                raise Unsupported("this op is not understood by channel-groups")
            else:
                if not rule.folds and any(self.tags[a].folded for a in nodes_in(
                        (node.args, node.kwargs)) if a in self.tags):
                    raise Unsupported("its operand has channels folded into the batch dim, "
                                      "which this op cannot follow")
                rule.visit(self, node)
        except Unsupported as e:
            self.block_inputs(node, f"{node.name} ({node.target}): {e}")
            self.tags.pop(node, None)
            self.steps.pop(node, None)
            self.parts.pop(node, None)

    def getitem(self, node: Node) -> None:
        """An item of a tuple result (split, batch_norm, max_pool with indices)."""
        source, index = node.args
        if source not in self.parts:
            raise Unsupported("indexes a tensor (getitem) along its channels")
        tag, step = self.parts[source][index]
        if tag is not None and step is not None:
            self.set(node, tag.dims, tag.atoms, step, tag.folded)

    def check_uses(self) -> None:
        """A member tensor also read by an op the flow does not model (a tied embedding, a
        weight reused by hand) cannot be sliced: block its channels. So are the indices of a
        member dim that another use of the weight reads along untracked channels
        (:meth:`untracked`): every use of a weight slices the same tensor."""
        for key, reason in self.fixed.items():
            if key in self.members:
                atoms = self.members[key].atoms
                self.block(atoms[atoms >= 0], reason)
        readers: dict[str, set[Node]] = {}
        for node in self.graph.module.graph.nodes:
            if node.op != "call_function" or mask_of(node):
                continue  # a mask node is transparent: its users read the weight
            for arg in nodes_in((node.args, node.kwargs)):
                name = self.param_of(arg)
                if name is not None:
                    readers.setdefault(name, set()).add(node)
        for (name, _), record in self.members.items():
            others = readers.get(name, set()) - self.uses.get(name, set())
            if others:
                other = min(others, key=lambda n: n.name)
                self.block(record.atoms[record.atoms >= 0],
                           f"{name} is also read by {other.name} ({other.target}), which "
                           "channel-groups does not track")


    def settle_boxes(self) -> torch.Tensor:
        """Make every multi-dim tag (and every :meth:`box` constraint) a box: each unit it holds
        must be a union of whole hyperplanes along one allowed axis. Joins only merge units, so
        a constraint once met stays met; the loop ends when a pass joins nothing. Returns the
        unit labels of the atoms (see :class:`Flow`)."""
        edges = torch.cat(self.edges, 1) if self.edges else torch.zeros(2, 0, dtype=torch.long)
        labels = components(torch.arange(self.count), edges)
        boxes = list(self.boxes) + [(t.atoms, None) for t in self.tags.values() if t.atoms.dim() > 1]
        changed = bool(boxes)
        while changed:
            changed = False
            for atoms, axes in boxes:
                if atoms.numel() == 0 or atoms.dim() < 2:
                    continue
                units = labels[atoms]
                allowed = range(atoms.dim()) if axes is None else axes
                if any(_along(units, axis) for axis in allowed):
                    continue
                axis = next(iter(allowed))
                before = len(self.edges)
                self.join_rows(atoms, axis)
                if len(self.edges) > before:
                    labels = components(labels, self.edges[-1])
                changed = True
        return labels


def components(labels: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Connected components: ``labels`` (each atom's smallest atom so far, a valid labelling of
    the joins before ``edges``) merged along ``edges`` (``[2, E]``); each atom ends labelled with
    the smallest atom of its component. Hooking roots to the smaller root, then pointer jumping,
    until every edge joins equal labels (labels only decrease, so this ends)."""
    labels = labels.clone()
    if not edges.numel():
        return labels
    u, v = edges[0], edges[1]
    while True:
        lu, lv = labels[u], labels[v]
        differ = lu != lv
        if not bool(differ.any()):
            return labels
        lu, lv = lu[differ], lv[differ]
        low = torch.minimum(lu, lv)
        labels.scatter_reduce_(0, torch.cat([lu, lv]), torch.cat([low, low]), "amin")
        while True:  # every atom points at its root
            jumped = labels[labels]
            if torch.equal(jumped, labels):
                break
            labels = jumped


def _effectful(node: Node) -> bool:
    """Whether ``node`` matters without users: an in-place op, or a check (``_assert_*``)."""
    name = getattr(getattr(node.target, "overloadpacket", node.target), "__name__", "")
    return name.endswith("_") or name.startswith("_assert")


def _along(units: torch.Tensor, axis: int) -> bool:
    """Whether ``units`` depends on the index along ``axis`` only."""
    rows = units.movedim(axis, 0).reshape(units.shape[axis], -1)
    return bool((rows == rows[:, :1]).all())


def trace_channels(graph: Graph) -> Flow:
    """Follow every conv/linear/addmm output channel through ``graph``; see the package doc."""
    return Walk(graph).run()
