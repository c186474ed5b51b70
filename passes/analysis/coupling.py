"""Channel flow on the ATen graph: which tensor positions carry which channels, and which must go
together.

Every output channel of a conv/linear/addmm is an *atom*. Walking the graph in order, each tensor
gets a :class:`Tag`: the dims that carry channels and, for every position along them, its atom.
Ops move atoms around (view, transpose, cat, split…), pass them through (activations, BatchNorm,
pooling), or force atoms to be removed together (a residual add joins the atoms meeting at each
position; attention joins a head's q, k and v; a view that splits a channel dim into
(heads, head_dim) joins each head). Those joins are edges of a networkx graph whose connected
components are the removable units. Parameters (and BatchNorm's running stats) that are indexed by
a channel are *members*: ``(name, dim, index) -> atom``.

An op the flow does not understand never guesses: the atoms of its tagged inputs are *blocked*
with the reason, and they (and everything joined to them) are never removed. So are atoms that
reach the model output, meet an untracked tensor (e.g. a residual stream after LayerNorm, whose
statistics span all channels), or would need an inexact rewrite.

Each step also keeps a ``transfer`` function over tag-space tensors (one entry per channel
position), used here on atom ids and by ``shrink`` on the per-channel constants of removed
channels.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import sympy
import torch
from torch.fx import Node

from chop.ir.graph import Graph
from chop.ir.masks import mask_of

log = logging.getLogger("chop")
aten = torch.ops.aten


@dataclass
class Tag:
    """The channel layout of one tensor: ``dims`` (ascending) carry channels; ``atoms`` has the
    sizes of those dims and holds the atom id at each position."""

    dims: tuple[int, ...]
    atoms: torch.Tensor


Transfer = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class Step:
    """How a node's tag derives from its inputs' tags.

    ``kind``: ``new`` (a producer: fresh atoms), ``map`` (positions moved or passed unchanged:
    ``transfer`` applies to constants too), ``compute`` (elementwise op: constants are computed
    with the op itself), ``norm`` (BatchNorm: per-channel affine in eval mode), ``depthwise``
    (a depthwise conv, channel-wise), ``opaque`` (channels pass but a constant does not stay
    known). ``inputs`` are the operands ``transfer`` reads (None for untracked ones, see
    ``fill``).
    """

    kind: str
    inputs: list[Node | None]
    transfer: Transfer
    info: dict[str, Any] = field(default_factory=dict)
    fill: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Consumer:
    """A weight op reading tracked channels: its input positions are the weight's ``in_dim``."""

    node: Node
    weight: str
    kind: str  # "linear", "addmm" or "conv"
    input: Node
    groups: int = 1
    padded: bool = False


@dataclass
class MemberRecord:
    """A parameter (or buffer) dim indexed by channels: ``atoms[i]`` is index i's atom (-1: none)."""

    name: str
    dim: int
    kind: str  # "parameter" or "buffer"
    role: str  # "out" (a producer's rows), "in" (a consumer's columns), "channel" (per-channel)
    atoms: torch.Tensor


class Unsupported(Exception):
    """Raised by a rule: the op cannot carry these channels; the message is the reason."""


@dataclass
class Flow:
    """The result of :func:`trace_channels`."""

    tags: dict[Node, Tag]
    steps: dict[Node, Step]
    consumers: list[Consumer]
    members: dict[tuple[str, int], MemberRecord]
    coupling: nx.Graph
    blocked: dict[int, str]
    heads: set[int]
    parts: dict[Node, list[tuple[Tag | None, Step | None]]]


def _expr(size: Any) -> sympy.Expr:
    return sympy.Integer(size) if isinstance(size, int) else sympy.sympify(size.node.expr)


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return a == b or sympy.expand(a - b) == 0


def _val(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: Node) -> list[Any]:
    value = _val(node)
    if value is None:
        raise Unsupported(f"the shape of {node.name} is unknown (no meta['val'])")
    return list(value.shape)


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _varies(t: torch.Tensor, dim: int) -> bool:
    return t.shape[dim] > 1 and not bool((t == t.narrow(dim, 0, 1)).all())


def _nodes_in(value: Any) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg(value, out.append)
    return out


_UNARY = {
    aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.silu, aten.sigmoid, aten.tanh,
    aten.hardtanh, aten.hardtanh_, aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu,
    aten.mish, aten.softplus, aten.neg, aten.abs, aten.exp, aten.sqrt, aten.rsqrt, aten.square,
    aten.erf, aten.sin, aten.cos, aten.log, aten.clamp, aten.clamp_min, aten.clamp_max,
    aten._to_copy, aten.to, aten.type_as,
}
_IDENTITY = {aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.clone, aten.contiguous,
             aten.alias, aten.detach, aten.lift_fresh_copy}
_BINARY = {aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_,
           aten.pow, aten.maximum, aten.minimum}
_CONV = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution}
_POOL = {aten.max_pool1d: 1, aten.max_pool2d: 2, aten.max_pool3d: 3, aten.avg_pool1d: 1,
         aten.avg_pool2d: 2, aten.avg_pool3d: 3, aten.adaptive_avg_pool1d: 1,
         aten.adaptive_avg_pool2d: 2, aten.adaptive_avg_pool3d: 3, aten.adaptive_max_pool1d: 1,
         aten.adaptive_max_pool2d: 2, aten.max_pool2d_with_indices: 2}
_REDUCE = {aten.mean: "mean", aten.sum: "sum", aten.amax: "max", aten.amin: "max"}
_RESHAPE = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
            aten.squeeze, aten.unsqueeze, aten.view_as, aten.reshape_as}
_SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
_IGNORED = {aten.sym_size, aten._assert_tensor_metadata, aten.sym_numel, aten.sym_stride}


def _identity(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


class _Tracer:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.params = dict(graph.module.named_parameters())
        self.buffers = dict(graph.module.named_buffers())
        self.tags: dict[Node, Tag] = {}
        self.steps: dict[Node, Step] = {}
        self.parts: dict[Node, list[tuple[Tag | None, Step | None]]] = {}
        self.consumers: list[Consumer] = []
        self.members: dict[tuple[str, int], MemberRecord] = {}
        self.coupling = nx.Graph()
        self.blocked: dict[int, str] = {}
        self.heads: set[int] = set()
        self.spaces: dict[tuple[str, int], torch.Tensor] = {}
        self.uses: dict[str, set[Node]] = {}
        self.current: Node | None = None
        self.count = 0

    # -- atoms, members, blocking -------------------------------------------------------------

    def new_atoms(self, n: int, origin: str) -> torch.Tensor:
        atoms = torch.arange(self.count, self.count + n)
        self.coupling.add_nodes_from((int(a), {"origin": origin, "index": i})
                                     for i, a in enumerate(atoms))
        self.count += n
        return atoms

    def space(self, name: str, dim: int) -> torch.Tensor:
        """The atoms of a weight's output dim (shared by every use of the weight)."""
        if (name, dim) not in self.spaces:
            size = self.params[name].shape[dim]
            self.spaces[name, dim] = self.new_atoms(size, f"{name}[dim {dim}]")
        return self.spaces[name, dim]

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        pairs = {(int(x), int(y)) for x, y in zip(a.flatten().tolist(), b.flatten().tolist()) if x != y}
        self.coupling.add_edges_from(pairs)

    def member(self, name: str | None, dim: int, atoms: torch.Tensor, role: str,
               index: torch.Tensor | None = None) -> None:
        if name is None:
            return
        if self.current is not None:
            self.uses.setdefault(name, set()).add(self.current)
        kind = "parameter" if name in self.params else "buffer"
        tensor = self.params.get(name, self.buffers.get(name))
        key = (name, dim)
        if key not in self.members:
            self.members[key] = MemberRecord(name, dim, kind, role,
                                             torch.full((tensor.shape[dim],), -1, dtype=torch.long))
        record = self.members[key]
        index = torch.arange(len(atoms)) if index is None else index
        old = record.atoms[index]
        seen = old >= 0
        self.join(old[seen], atoms[seen])
        record.atoms[index[~seen]] = atoms[~seen]

    def block(self, atoms: torch.Tensor, reason: str) -> None:
        for a in atoms.flatten().unique().tolist():
            self.blocked.setdefault(int(a), reason)

    def block_inputs(self, node: Node, reason: str) -> None:
        for arg in _nodes_in((node.args, node.kwargs)):
            if arg in self.tags:
                self.block(self.tags[arg].atoms, reason)
        log.debug("channel-groups: %s", reason)

    def set(self, node: Node, dims: tuple[int, ...], atoms: torch.Tensor, step: Step) -> None:
        self.tags[node] = Tag(tuple(dims), atoms)
        self.steps[node] = step

    # -- helpers for rules ---------------------------------------------------------------------

    def param_of(self, arg: Any) -> str | None:
        if not isinstance(arg, Node):
            return None
        if arg.op == "get_attr" and (arg.target in self.params or arg.target in self.buffers):
            return arg.target
        return mask_of(arg)

    def tag(self, arg: Any) -> Tag | None:
        return self.tags.get(arg) if isinstance(arg, Node) else None

    def single(self, node: Node, arg: Any, dim: int) -> Tag | None:
        """The tag of ``arg`` if it carries channels only along ``dim`` (None if untracked)."""
        tag = self.tag(arg)
        if tag is not None and tag.dims != (dim,):
            raise Unsupported(f"expects channels along dim {dim} only, found them along {tag.dims}")
        return tag

    # -- the walk -----------------------------------------------------------------------------

    def run(self) -> Flow:
        for node in self.graph.module.graph.nodes:
            if node.op == "output":
                for arg in _nodes_in(node.args):
                    if arg in self.tags:
                        self.block(self.tags[arg].atoms,
                                   f"{arg.name} reaches the model output (its channels are "
                                   "outputs of the model)")
            elif node.op == "call_module":
                if any(a in self.tags for a in _nodes_in((node.args, node.kwargs))):
                    self.block_inputs(node, f"{node.name}: call_module {node.target} is opaque")
            elif node.op == "call_function":
                self.visit(node)
        self.check_uses()
        return Flow(self.tags, self.steps, self.consumers, self.members, self.coupling,
                    self.blocked, self.heads, self.parts)

    def check_uses(self) -> None:
        """A member tensor also read by an op the flow does not model (a tied embedding, a
        weight reused by hand) cannot be sliced: block its channels."""
        readers: dict[str, set[Node]] = {}
        for node in self.graph.module.graph.nodes:
            if node.op != "call_function":
                continue
            if mask_of(node):
                continue  # a mask node is transparent: its users read the weight
            for arg in _nodes_in((node.args, node.kwargs)):
                name = self.param_of(arg)
                if name is not None:
                    readers.setdefault(name, set()).add(node)
        for (name, _), record in self.members.items():
            others = readers.get(name, set()) - self.uses.get(name, set())
            if others:
                other = sorted(others, key=lambda n: n.name)[0]
                self.block(record.atoms[record.atoms >= 0],
                           f"{name} is also read by {other.name} ({other.target}), which "
                           "channel-groups does not track")

    def visit(self, node: Node) -> None:
        packet = getattr(node.target, "overloadpacket", None)
        tracked = [a for a in _nodes_in((node.args, node.kwargs)) if a in self.tags or a in self.parts]
        producer = packet in _CONV or packet in (aten.linear, aten.addmm)
        if not tracked and not producer:
            return
        self.current = node
        try:
            if node.target is operator.getitem:
                self.getitem(node)
            elif producer:
                self.producer(node, packet)
            elif packet in _IGNORED:
                self.ignored(node, packet)
            else:
                rule = _RULES.get(packet)
                if rule is None:
                    raise Unsupported("this op is not understood by channel-groups")
                rule(self, node)
        except Unsupported as e:
            self.block_inputs(node, f"{node.name} ({node.target}): {e}")
            self.tags.pop(node, None)
            self.steps.pop(node, None)

    def ignored(self, node: Node, packet: Any) -> None:
        if packet is aten.sym_size:
            tag = self.tags[node.args[0]]
            if _dim(node.args[1], len(_shape(node.args[0]))) in tag.dims:
                raise Unsupported("reads the size of a channel dim")
        elif packet is aten._assert_tensor_metadata and node.kwargs.get("size") is not None:
            raise Unsupported("asserts the size of a tensor whose channels may shrink")

    def getitem(self, node: Node) -> None:
        source, index = node.args
        if source not in self.parts:
            raise Unsupported("indexes a tensor (getitem) along its channels")
        tag, step = self.parts[source][index]
        if tag is not None and step is not None:
            self.set(node, tag.dims, tag.atoms, step)

    # -- producers ----------------------------------------------------------------------------

    def producer(self, node: Node, packet: Any) -> None:
        if packet is aten.linear:
            x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
            in_dim, out_dim, kind = 1, 0, "linear"
            channel = len(_shape(x)) - 1
        elif packet is aten.addmm:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                raise Unsupported("addmm with beta/alpha other than 1")
            bias, x, weight = node.args[:3]
            in_dim, out_dim, kind, channel = 0, 1, "addmm", 1
        else:
            return self.conv(node, packet)
        w = self.param_of(weight)
        b = self.param_of(bias)
        if w is None or w not in self.params or (bias is not None and b is None):
            raise Unsupported("its weight or bias is computed, not a parameter")
        tag = self.single(node, x, channel)
        if tag is not None:
            self.member(w, in_dim, tag.atoms, "in")
            self.consumers.append(Consumer(node, w, kind, x))
        out = self.space(w, out_dim)
        self.member(w, out_dim, out, "out")
        if bias is not None and _val(bias) is not None and _val(bias).shape[-1] == len(out):
            self.member(b, _val(bias).dim() - 1, out, "out")
        elif bias is not None:
            raise Unsupported("its bias does not have one entry per output channel")
        ndim = len(_shape(node))
        self.set(node, (ndim - 1,), out, Step("new", [], _identity,
                                              {"weight": w, "dim": out_dim, "bias": b}))

    def conv(self, node: Node, packet: Any) -> None:
        x, weight, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
        if packet is aten.convolution:
            if node.args[6]:
                raise Unsupported("transposed convolution")
            padding, groups = node.args[4], node.args[8]
        else:
            padding, groups = _arg(node, 4, "padding", 0), _arg(node, 6, "groups", 1)
        w, b = self.param_of(weight), self.param_of(bias)
        if w is None or w not in self.params or (bias is not None and b is None):
            raise Unsupported("its weight or bias is computed, not a parameter")
        shape = self.params[w].shape
        out_c, in_g = shape[0], shape[1]
        in_c = in_g * groups
        padded = padding == "same" or (not isinstance(padding, str) and any(
            p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding])))
        tag = self.single(node, x, 1)
        info = {"weight": w, "dim": 0, "bias": b, "groups": groups, "padded": padded}
        if groups > 1 and in_g == 1 and tag is not None:  # depthwise (channel multiplier k)
            k = out_c // in_c
            out = tag.atoms.repeat_interleave(k)
            self.member(w, 0, out, "channel")
            self.member(b, 0, out, "channel")
            self.set(node, (1,), out, Step("depthwise", [x], lambda ts, k=k: ts[0].repeat_interleave(k),
                                           info))
            return
        if tag is not None:
            for g in range(1, groups):  # grouped: the same relative index goes in every group
                self.join(tag.atoms[:in_g], tag.atoms[g * in_g:(g + 1) * in_g])
            self.member(w, 1, tag.atoms[:in_g], "in")
            self.consumers.append(Consumer(node, w, "conv", x, groups, padded))
        out = self.space(w, 0)
        out_g = out_c // groups
        for g in range(1, groups):
            self.join(out[:out_g], out[g * out_g:(g + 1) * out_g])
        self.member(w, 0, out, "out")
        self.member(b, 0, out, "out")
        self.set(node, (1,), out, Step("new", [], _identity, info))

    # -- channel-wise ops ---------------------------------------------------------------------

    def same(self, node: Node, kind: str = "map", info: dict | None = None) -> None:
        x = node.args[0]
        tag = self.tags[x]
        self.set(node, tag.dims, tag.atoms, Step(kind, [x], _identity, info or {}))

    def unary(self, node: Node) -> None:
        if node.target in (aten.to.dtype_layout, aten.to.device, aten.to.dtype, aten.to.other) or \
                node.target.overloadpacket in (aten._to_copy, aten.to, aten.type_as):
            return self.same(node, "map")
        self.same(node, "compute")

    def identity(self, node: Node) -> None:
        self.same(node, "map")

    def binary(self, node: Node) -> None:
        ndim = len(_shape(node))
        operands = [a for a in node.args[:2]]
        tagged, other = [], []
        for a in operands:
            if not isinstance(a, Node):
                continue
            shift = ndim - len(_shape(a))
            if a in self.tags:
                t = self.tags[a]
                tagged.append((a, tuple(d + shift for d in t.dims), t.atoms))
            else:
                other.append((a, shift))
        first, dims, atoms = tagged[0]
        for a, d, at in tagged[1:]:
            if d != dims or at.shape != atoms.shape:
                raise Unsupported(f"combines channels along {dims} with channels along {d}")
            self.join(atoms, at)
        for a, shift in other:
            shape = _shape(a)
            for d in dims:
                if d - shift >= 0 and shape[d - shift] != 1:
                    raise Unsupported(
                        f"combines these channels with {a.name}, whose channels are not tracked "
                        "(e.g. a residual stream normalised by layer_norm, or a model input)")
        self.set(node, dims, atoms, Step("compute", [t[0] for t in tagged], _identity,
                                         {"operands": operands}))

    def batch_norm(self, node: Node) -> None:
        x = node.args[0]
        self.single(node, x, 1)
        atoms = self.tags[x].atoms
        names = [self.param_of(a) for a in node.args[1:5]]
        for name in names:
            self.member(name, 0, atoms, "channel")
        eps = node.args[7] if node.target.overloadpacket is aten.batch_norm else node.args[6]
        step = Step("norm", [x], _identity, {"names": names, "eps": eps})
        if node.target.overloadpacket is aten.batch_norm:
            self.set(node, (1,), atoms, step)
        else:  # _native_batch_norm_legit_no_training: (out, mean, rstd)
            self.parts[node] = [(Tag((1,), atoms), step), (None, None), (None, None)]

    def layer_norm(self, node: Node) -> None:
        x, normalized = node.args[0], node.args[1]
        tag, ndim = self.tags[x], len(_shape(x))
        if any(d >= ndim - len(normalized) for d in tag.dims):
            raise Unsupported("layer_norm normalises over these channels: removing one changes "
                              "the mean and variance of the others")
        self.same(node, "opaque")

    def pool(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        spatial = _POOL[node.target.overloadpacket]
        if any(d >= len(_shape(x)) - spatial for d in tag.dims):
            raise Unsupported("pools over a channel dim")
        packet = node.target.overloadpacket
        exact = True
        if packet in (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d):
            padding = _arg(node, 3, "padding", 0)
            padded = any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
            exact = not padded or not _arg(node, 5, "count_include_pad", True)
        step = Step("map" if exact else "opaque", [x], _identity)
        if packet is aten.max_pool2d_with_indices:
            self.parts[node] = [(Tag(tag.dims, tag.atoms), step), (None, None)]
        else:
            self.set(node, tag.dims, tag.atoms, step)

    def reduce(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        ndim = len(_shape(x))
        dims = _arg(node, 1, "dim", None)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise Unsupported("reduces over every dim, channels included")
        dims = {_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if dims & set(tag.dims):
            raise Unsupported("reduces over a channel dim")
        keep = _arg(node, 2, "keepdim", False)
        out = tag.dims if keep else tuple(d - sum(r < d for r in dims) for d in tag.dims)
        kind = "map" if _REDUCE[node.target.overloadpacket] in ("mean", "max") else "opaque"
        self.set(node, out, tag.atoms, Step(kind, [x], _identity))

    def softmax(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        if _dim(node.args[1], len(_shape(x))) in tag.dims:
            raise Unsupported("normalises over a channel dim")
        self.same(node, "opaque")

    def transpose(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        ndim = len(_shape(x))
        packet = node.target.overloadpacket
        if packet is aten.permute:
            perm = [_dim(d, ndim) for d in node.args[1]]
        else:
            d0, d1 = (0, 1) if packet is aten.t else (_dim(node.args[1], ndim), _dim(node.args[2], ndim))
            perm = list(range(ndim))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        new = [perm.index(d) for d in tag.dims]
        order = sorted(range(len(new)), key=lambda i: new[i])
        fn = (lambda ts, order=order: ts[0].permute(order))
        self.set(node, tuple(sorted(new)), fn([tag.atoms]), Step("map", [x], fn))

    def select(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        d = _dim(node.args[1], len(_shape(x)))
        if d in tag.dims:
            raise Unsupported("selects one channel")
        self.set(node, tuple(e - (e > d) for e in tag.dims), tag.atoms, Step("map", [x], _identity))

    def slice(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        shape = _shape(x)
        d = _dim(_arg(node, 1, "dim", 0), len(shape))
        if d not in tag.dims:
            return self.same(node, "map")
        start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
        if len(tag.dims) != 1 or step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
            raise Unsupported("slices channels with a step, a dynamic bound or a multi-dim layout")
        lo, hi, _ = slice(start, end).indices(int(shape[d]))
        fn = (lambda ts, lo=lo, hi=hi: ts[0][lo:hi])
        self.set(node, tag.dims, fn([tag.atoms]), Step("map", [x], fn, {"range": (lo, hi)}))

    def expand(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        shift = len(_shape(node)) - len(_shape(x))
        self.set(node, tuple(d + shift for d in tag.dims), tag.atoms, Step("map", [x], _identity))

    def cat(self, node: Node) -> None:
        tensors = list(node.args[0])
        ndim = len(_shape(node))
        d = _dim(_arg(node, 1, "dim", 0), ndim)
        tags = [self.tag(t) for t in tensors]
        if any(t is not None and t.dims != (d,) for t in tags):
            if any(t is None or t.dims != tags[0].dims for t in tags):
                raise Unsupported("concatenates tensors with different channel layouts")
            for t in tags[1:]:
                self.join(tags[0].atoms, t.atoms)
            return self.set(node, tags[0].dims, tags[0].atoms, Step("map", [tensors[0]], _identity))
        step = Step("map", [], lambda ts: torch.cat(ts), {"sizes": []})
        parts = []
        for i, (t, tag) in enumerate(zip(tensors, tags)):
            if tag is None:
                size = _shape(t)[d]
                if not isinstance(size, int):
                    raise Unsupported("concatenates a tensor of dynamic size along the channels")
                fresh = self.new_atoms(size, f"{t.name} (untracked)")
                self.block(fresh, f"{node.name}: channels of {t.name} are concatenated in but "
                                  "come from a tensor chop cannot shrink")
                step.fill[i] = fresh
                parts.append(fresh)
                step.inputs.append(None)
            else:
                parts.append(tag.atoms)
                step.inputs.append(t)
            step.info["sizes"].append(len(parts[-1]))
        self.set(node, (d,), torch.cat(parts), step)

    def split(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        shape = _shape(x)
        d = _dim(_arg(node, 2, "dim", 0), len(shape))
        n = shape[d]
        packet = node.target.overloadpacket
        if packet is aten.chunk:
            raise Unsupported("chunk is not supported; it is exported as split")
        if d not in tag.dims:
            count = len(node.meta["val"]) if isinstance(node.meta.get("val"), (list, tuple)) else 0
            self.parts[node] = [(Tag(tag.dims, tag.atoms), Step("map", [x], _identity))] * count
            return
        if len(tag.dims) != 1:
            raise Unsupported("splits a multi-dim channel layout")
        if packet is aten.split_with_sizes:
            sizes = list(node.args[1])
        else:
            size = node.args[1]
            sizes = [min(size, n - s) for s in range(0, n, size)]
        parts, start = [], 0
        for s in sizes:
            fn = (lambda ts, lo=start, hi=start + s: ts[0][lo:hi])
            step = Step("map", [x], fn, {"range": (start, start + s)})
            parts.append((Tag(tag.dims, fn([tag.atoms])), step))
            start += s
        self.parts[node] = parts
        self.steps[node] = Step("split", [x], _identity, {"sizes": sizes, "dim": d})

    def reshape(self, node: Node) -> None:
        x, tag = node.args[0], self.tags[node.args[0]]
        dims, fn, heads = _reshape_transfer(_shape(x), _shape(node), tag)
        atoms = fn([tag.atoms])
        for rows in heads:  # a split channel dim: each outer index goes as one unit
            for i in range(atoms.shape[rows]):
                row = atoms.select(rows, i).flatten()
                self.join(row[:1].expand_as(row), row)
        self.set(node, dims, atoms, Step("map", [x], fn))

    def attention(self, node: Node) -> None:
        q, k, v = node.args[:3]
        if _arg(node, 7, "enable_gqa", False):
            raise Unsupported("grouped-query attention")
        tags = [self.tag(t) for t in (q, k, v)]
        if any(t is None or t.dims != (1, 3) for t in tags) or not (
                tags[0].atoms.shape == tags[1].atoms.shape == tags[2].atoms.shape):
            raise Unsupported("attention whose q, k and v do not all carry heads along dim 1 and "
                              "head features along dim 3 with the same layout")
        mask = _arg(node, 3, "attn_mask")
        if isinstance(mask, Node) and mask in self.tags:
            raise Unsupported("its attention mask carries channels")
        for h in range(tags[0].atoms.shape[0]):
            head = torch.cat([t.atoms[h].flatten() for t in tags])
            self.join(head[:1].expand_as(head), head)
            self.heads.update(head.tolist())
        self.set(node, (1, 3), tags[2].atoms, Step("map", [v], _identity))


def _reshape_transfer(
    in_shape: list[Any], out_shape: list[Any], tag: Tag
) -> tuple[tuple[int, ...], Transfer, list[int]]:
    """The output channel dims of a reshape, the transfer, and the output dims whose rows must
    be joined (a channel dim split into several varying dims, e.g. into (heads, head_dim))."""
    pin = [sympy.Integer(1)]
    for s in in_shape:
        pin.append(pin[-1] * _expr(s))
    pout = [sympy.Integer(1)]
    for s in out_shape:
        pout.append(pout[-1] * _expr(s))
    segments, i0, j0 = [], 0, 0
    while i0 < len(in_shape) or j0 < len(out_shape):
        found = None
        for i in range(i0 + 1, len(in_shape) + 1):
            for j in range(j0 + 1, len(out_shape) + 1):
                if _same(pin[i], pout[j]):
                    found = (i, j)
                    break
            if found:
                break
        if found is None:  # trailing size-1 dims
            found = (len(in_shape), len(out_shape))
        segments.append((range(i0, found[0]), range(j0, found[1])))
        i0, j0 = found
    full_in, full_out, tagged_out = [], [], []
    for ins, outs in segments:
        has_tag = any(d in tag.dims for d in ins)
        if has_tag and not all(isinstance(in_shape[d], int) for d in ins):
            raise Unsupported("merges a channel dim with a dynamic dim")
        if has_tag and not all(isinstance(out_shape[d], int) for d in outs):
            raise Unsupported("reshapes a channel dim into a dynamic dim")
        full_in += [in_shape[d] if has_tag else 1 for d in ins]
        full_out += [out_shape[d] if has_tag else 1 for d in outs]
        if has_tag:
            tagged_out.append(list(outs))
    lead = [in_shape[d] if d in tag.dims else 1 for d in range(len(in_shape))]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(lead).expand(full_in).reshape(full_out)

    probe = expand(tag.atoms)
    dims, heads = [], []
    for outs in tagged_out:
        varying = [d for d in outs if _varies(probe, d)]
        if not varying:
            varying = [next((d for d in outs if full_out[d] > 1), outs[0])]
        dims += varying
        if len(varying) > 1:
            heads.append(len(dims) - len(varying))
    drop = [d for d in range(len(full_out)) if d not in dims]

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        t = expand(ts[0])
        for d in reversed(drop):
            t = t.select(d, 0)
        return t

    return tuple(dims), fn, heads


_RULES: dict[Any, Callable[[_Tracer, Node], None]] = {
    **{p: _Tracer.unary for p in _UNARY},
    **{p: _Tracer.identity for p in _IDENTITY},
    **{p: _Tracer.binary for p in _BINARY},
    **{p: _Tracer.pool for p in _POOL},
    **{p: _Tracer.reduce for p in _REDUCE},
    **{p: _Tracer.reshape for p in _RESHAPE},
    **{p: _Tracer.softmax for p in _SOFTMAX},
    aten.batch_norm: _Tracer.batch_norm,
    aten._native_batch_norm_legit_no_training: _Tracer.batch_norm,
    aten.layer_norm: _Tracer.layer_norm,
    aten.transpose: _Tracer.transpose,
    aten.permute: _Tracer.transpose,
    aten.t: _Tracer.transpose,
    aten.select: _Tracer.select,
    aten.slice: _Tracer.slice,
    aten.expand: _Tracer.expand,
    aten.cat: _Tracer.cat,
    aten.split: _Tracer.split,
    aten.split_with_sizes: _Tracer.split,
    aten.scaled_dot_product_attention: _Tracer.attention,
}


def trace_channels(graph: Graph) -> Flow:
    """Follow every conv/linear/addmm output channel through ``graph``; see the module doc."""
    return _Tracer(graph).run()
