"""What a rule is, how rules are registered and found, and the records they leave for the
constants analysis and shrink (see the package doc for the framework)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.fx import Node

from chop.errors import InternalError

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.rules.producers import Producer
    from chop.passes.analysis.flow.walk import Walk

aten = torch.ops.aten
Transfer = Callable[[list[torch.Tensor]], torch.Tensor]
# the words of the reasons no rule could lift: a unit blocked by one of them reports it first
OUTPUT = "reaches the model output"
NORMALISED = "normalises over these channels"


def rank(reason: str) -> int:
    """Which of several reasons a blocked channel reports (lowest first): its channels are
    model outputs, a normalisation spans them, anything else."""
    return 0 if OUTPUT in reason else 1 if NORMALISED in reason else 2
Const = tuple[torch.Tensor, torch.Tensor]  # (value, known), one entry per channel position


class Unsupported(Exception):
    """Raised by a rule: the op cannot carry these channels; the message is the reason. The walk
    blocks the channels with it; it never leaves the walk."""


@dataclass
class Tag:
    """The channel layout of one tensor: ``dims`` (ascending) carry channels; ``atoms`` has the
    sizes of those dims and holds the atom id at each position. A dim in ``folded`` is the batch
    (dynamic, outer) times the channels (``atoms``' size there, inner): ``nn.MultiheadAttention``
    folds its heads into the batch as ``[seq, batch·heads, head_dim]``."""

    dims: tuple[int, ...]
    atoms: torch.Tensor
    folded: tuple[int, ...] = ()


def identity(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


@dataclass
class Step:
    """What the walk recorded at one node: the rule answering for it (``constant``,
    ``rewrite``), the operands ``transfer`` reads (None: an untracked operand whose positions
    ``fill`` holds), and facts the rule noted for later."""

    rule: Rule
    inputs: list[Node | None]
    transfer: Transfer = identity
    info: dict[str, Any] = field(default_factory=dict)
    fill: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Consumer:
    """A weight op reading tracked channels: ``input``'s channel positions are the weight's input
    dim. ``rule`` (the op's producer rule) knows the weight layout; ``folds``: a constant input
    channel folds exactly into the op's bias (not so behind padding)."""

    node: Node
    weight: str
    input: Node
    rule: Producer
    groups: int = 1
    folds: bool = True


@dataclass
class Cut:
    """The channels shrink removes, as rules see them: ``removed[atom]`` is True for every atom
    that goes; ``tags`` are the walk's."""

    tags: dict[Node, Tag]
    removed: torch.Tensor
    _gone: dict[Node, torch.Tensor] = field(default_factory=dict, repr=False)

    def gone(self, node: Node) -> torch.Tensor:
        """Bool, ``node``'s tag shape: True at the positions that go (computed once per node:
        shrink and the rules ask several times; do not modify it)."""
        found = self._gone.get(node)
        if found is None:
            found = self._gone[node] = self.removed[self.tags[node].atoms]
        return found

    def any(self, node: Any) -> bool:
        return node in self.tags and bool(self.gone(node).any())

    def sizes(self, node: Node) -> dict[int, int]:
        """The new size of each channel dim of ``node`` (the kept positions must form a box)."""
        keep = ~self.gone(node)
        if keep.dim() == 1:  # one channel dim: always a box
            return {self.tags[node].dims[0]: int(keep.sum())}
        sizes, box = [], torch.ones((), dtype=torch.bool)
        for i in range(keep.dim()):
            kept_i = keep.movedim(i, 0).reshape(keep.shape[i], -1).any(1)
            sizes.append(int(kept_i.sum()))
            box = box.unsqueeze(-1) & kept_i if i else kept_i
        if not torch.equal(box, keep):
            raise InternalError(f"the channels kept at {node.name} do not form a box; this is a "
                                "bug in chop (please report it with the model)")
        return dict(zip(self.tags[node].dims, sizes))


class Rule:
    """How one family of ATen ops carries channels. Subclass, implement ``visit``, override
    ``constant``/``rewrite`` where the defaults do not hold, and register with :func:`register`.
    Rules keep no state: one instance serves every node of its ops."""

    creates: ClassVar[bool] = False  # visited even when no input carries channels (weight ops)
    folds: ClassVar[bool] = False  # follows channels folded into the batch (Tag.folded)

    def visit(self, walk: Walk, node: Node) -> None:
        """Tag ``node`` (``walk.set``, or ``walk.parts`` for a tuple result), joining and
        recording what it couples; raise :class:`Unsupported` to block its inputs' channels."""
        raise NotImplementedError

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        """``node``'s per-position constant from its operands' (``consts``, in tag space):
        positions move as ``step.transfer`` moves them."""
        pairs = [operand(consts, step, i) for i in range(len(step.inputs))]
        return step.transfer([p[0] for p in pairs]), step.transfer([p[1] for p in pairs])

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        """Edit ``node``'s arguments after shrink removed the positions ``cut`` gives."""


class Moved(Rule):
    """Values pass unchanged: the output carries the first operand's channels as they are."""

    folds = True

    def visit(self, walk: Walk, node: Node) -> None:
        walk.same(node, Step(self, [node.args[0]]))


RULES: dict[Any, Rule] = {}


def register(*ops: Any) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: ``@register(aten.batch_norm, …)`` makes one instance of the rule answer
    for those ATen op packets (or other fx call targets)."""

    def add(cls: type[Rule]) -> type[Rule]:
        rule = cls()
        for op in ops:
            if op in RULES:
                raise InternalError(f"{op} has two channel rules: {type(RULES[op]).__name__} "
                                    f"and {cls.__name__}")
            RULES[op] = rule
        return cls

    return add


def rule_for(node: Node) -> Rule | None:
    """The rule for ``node``'s op; an in-place op (``aten.silu_``) gets its out-of-place op's."""
    return RULES.get(packet(node))


def packet(node: Node) -> Any:
    """``node``'s op packet (its target if not an ATen op), out of place: ``aten.t`` for
    ``aten.t_``, unless the in-place op has a rule of its own."""
    found = getattr(node.target, "overloadpacket", node.target)
    name = getattr(found, "__name__", "")
    if found not in RULES and name.endswith("_") and not name.endswith("__"):
        return getattr(aten, name[:-1], found)
    return found


# -- helpers for rules -------------------------------------------------------------------------


def operand(consts: dict[Node, Const], step: Step, index: int) -> Const:
    """The constant of ``step.inputs[index]`` (unknown for an untracked operand)."""
    node = step.inputs[index]
    return unknown(step.fill[index].shape) if node is None else consts[node]


def unknown(shape: torch.Size) -> Const:
    return torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)


def tensor(graph: Graph, name: str | None) -> torch.Tensor | None:
    """The parameter or buffer ``name`` (None for None)."""
    if name is None:
        return None
    found = find_tensor(graph, name)
    if found is not None:
        return found.detach()
    try:  # raises fx's error
        return graph.module.get_parameter(name).detach()
    except AttributeError:
        return graph.module.get_buffer(name).detach()


def find_tensor(graph: Graph, name: str) -> torch.Tensor | None:
    """The parameter or buffer ``name``, else None; read afresh from its owner
    (:meth:`~chop.ir.graph.Graph.owner`: passes replace tensors)."""
    try:
        module, attr = graph.owner(name)
    except AttributeError:
        return None
    found = module._parameters.get(attr)
    return found if found is not None else module._buffers.get(attr)


def value_of(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Node) -> list[Any]:
    value = value_of(node)
    if value is None:
        raise Unsupported(f"the shape of {node.name} is unknown (no meta['val'])")
    return list(value.shape)


def positive(d: int, ndim: int) -> int:
    """Dim ``d`` counted from the front."""
    return d + ndim if d < 0 else d


def fixed_along(walk: Walk, tag: Tag, d: int) -> None:
    """Positions along channel dim ``d`` of a multi-dim layout are indexed by the op (sliced,
    selected, concatenated, scaled by a table): they never go one by one; whole hyperplanes
    along another channel dim (whole heads) go instead, so the op's indices stay valid."""
    walk.box(tag.atoms, tuple(i for i, e in enumerate(tag.dims) if e != d))
