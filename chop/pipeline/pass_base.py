"""The pass contract.

A pass is a small frozen dataclass: its fields are its options, with types and defaults; its
class attributes say who it is (``name``, kebab-case), what ``kind`` it is (analysis, transform
or export), which ``node.meta["chop"]`` keys it ``requires`` and which it ``provides``. Its one
method, :meth:`Pass.apply`, edits a :class:`~chop.ir.graph.Graph` and returns a
:class:`PassResult`. The work itself is a plain function others can call, or, for a family of
passes, a base class's hook (every criterion fills in ``Criterion.scores``, see
:mod:`chop.passes.analysis.criterion`)::

    @dataclass(frozen=True)
    class Fold(Pass):
        \"\"\"Bake masks into weights (weight * mask) and remove the mask nodes.\"\"\"
        name: ClassVar[str] = "fold"
        kind: ClassVar[str] = "export"
        requires: ClassVar[tuple[str, ...]] = ("mask",)

        def apply(self, graph, ctx):
            folded = fold_masks(graph)
            return PassResult(modified=bool(folded), info={"folded": len(folded)})

What the rest of chop must know about a pass is declared as a class attribute, never guessed
from its name:

- ``preserves``: the metadata keys that stay valid when the pass changes the graph (``"all"``,
  the default, for passes that change nothing analyses depend on). After a pass that reports
  ``modified``, the pass manager drops every other analysis key (``saliency``, ``mask``,
  ``channel_groups``, ``effective``: :data:`chop.ir.meta.ANALYSES`), so no later pass reads a
  stale analysis.
- ``reshapes``: the pass changes parameter shapes or storage (``shrink``, ``sparse``), so the
  original model class no longer loads the graph's state dict.
- ``accumulates``: the pass adds to the saliency already on the graph (``snip-momentum``), so a
  training loop runs it at every step rather than only when it prunes.
- ``acts_on_masks``: the pass removes what masks emptied (``shrink``), so on a graph with no
  mask it has nothing to do, and the pass manager says so.
- :meth:`Pass.data_batches`: how many ``(inputs, targets)`` batches the pass reads (0: none),
  so callers can check and load data before running anything.

Options are checked when the pass is built — from Python, a pipeline string or a TOML table —
against the field types (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``),
then by the pass's own :meth:`Pass.check` for ranges. Every failure is an
:class:`~chop.errors.OptionError` that names the pass, the option, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch.fx import Node

from chop.errors import OptionError, did_you_mean

if typing.TYPE_CHECKING:
    from chop.ir.graph import Graph


def option(default: Any, doc: str) -> Any:
    """A pass option: its default and a one-line doc shown by ``chop passes``."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, plus facts for reports and logs."""

    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


def _identity_track(items: Iterable, total: int | None, description: str) -> Iterable:
    return items


@dataclass
class Context:
    """What a pass may use besides the graph.

    Attributes:
        data: an iterable of ``(inputs, targets)`` batches; ``inputs`` is a tensor, a tuple of
            positional inputs, or a dict of keyword inputs.
        loss: ``loss(outputs, targets) -> scalar tensor``; None means cross-entropy.
        track: wraps a long loop for progress display: ``track(items, total, description)``.
        before: names of the passes that already ran in this pipeline.
        node: the node a pass is working on, named in error messages (see :meth:`visiting`).
        shared_data: with a torch.distributed process group, every rank was given the same
            ``data``: a data-parallel pass then scores its share of the batches it reads
            (batch i on rank i mod world size) instead of all of them, so the ranks together
            score each batch once (``chop`` under ``torchrun`` does this). False: each rank's
            ``data`` is its own.
    """

    data: Iterable | None = None
    loss: Callable[[Any, Any], Any] | None = None
    track: Callable[[Iterable, int | None, str], Iterable] = _identity_track
    before: list[str] = field(default_factory=list)
    node: Node | None = None
    shared_data: bool = False

    @contextmanager
    def visiting(self, node: Node) -> Iterator[Node]:
        """Mark ``node`` as the one being worked on; an error raised inside keeps it marked."""
        previous, self.node = self.node, node
        yield node
        self.node = previous


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses; see the module doc."""

    name: ClassVar[str] = ""
    kind: ClassVar[Literal["analysis", "transform", "export"]]
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...] | Literal["all"]] = "all"
    reshapes: ClassVar[bool] = False
    accumulates: ClassVar[bool] = False
    acts_on_masks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self._typed(f.name, getattr(self, f.name)))
        self.check()

    def _typed(self, key: str, value: Any) -> Any:
        """``value`` as option ``key``'s type (see :func:`_coerce`), or :class:`OptionError`."""
        hint = _option_hints(type(self))[key]
        checked = _coerce(value, hint)
        if key == "seed" and isinstance(checked, int) and checked not in SEEDS:
            raise OptionError(f"{self.name}: option seed={value} is out of range; expected an "
                              "integer from -2**63 to 2**64 - 1 (what torch's generators take)")
        if checked is _INVALID:
            finite = isinstance(value, float) and not math.isfinite(value)
            raise OptionError(
                f"{self.name}: option {key}={value!r} is not valid; expected {_describe(hint)}"
                + (" (a finite number)" if finite else "")
            )
        return checked

    def check(self) -> None:
        """Range checks beyond the field types; raise :class:`OptionError` with the fix."""

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        """Run the pass on ``graph`` (in place)."""
        raise NotImplementedError

    def data_batches(self) -> int:
        """How many ``(inputs, targets)`` batches of ``ctx.data`` the pass reads (0: none)."""
        return 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Pass:
        """Build the pass from a mapping of option names to values, rejecting unknown names."""
        return cls(**options)

    def __new__(cls, *args: Any, **options: Any) -> Pass:
        cls._known(options)  # Mask(sparsty=0.9): the pipeline string's error, not a TypeError
        return super().__new__(cls)

    @classmethod
    def _known(cls, options: Iterable[str]) -> None:
        """Raise :class:`OptionError` for a name in ``options`` that is not an option."""
        known = list(_option_hints(cls))  # the option names, in order (cached per class)
        for key in options:
            if key not in known:
                allowed = ", ".join(known) if known else "none"
                raise OptionError(
                    f"{cls.name} has no option {key!r}{did_you_mean(key, known)}; "
                    f"its options are: {allowed}"
                )

    def replace(self, **changes: Any) -> Pass:
        """A copy with ``changes`` to its options, typed and checked as :meth:`from_options`
        would, but coercing only the changed options (a training loop re-sparsifies a pass at
        every step)."""
        self._known(changes)
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        for key, value in changes.items():
            object.__setattr__(copy, key, self._typed(key, value))
        copy.check()
        return copy

    @classmethod
    def option_table(cls) -> list[tuple[str, str, Any, str]]:
        """``(name, type, default, doc)`` for every option, for ``chop passes`` and docs."""
        hints = _option_hints(cls)
        return [
            (f.name, _describe(hints[f.name], short=True), f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls)
        ]

    def options(self) -> dict[str, Any]:
        """The options this pass was built with, by name."""
        return {name: getattr(self, name) for name in _option_hints(type(self))}

    def __str__(self) -> str:
        changed = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }
        inner = ", ".join(f"{k}={_format(v)}" for k, v in changed.items())
        return f"{self.name}{{{inner}}}" if inner else self.name


_INVALID = object()
SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@functools.cache
def _option_hints(cls: type) -> dict[str, Any]:
    """The evaluated type of each option field (string annotations resolved in the class's
    module, with the names of :mod:`typing` available, so locally defined passes work too);
    computed once per class (a training loop builds a pass at every step)."""
    namespace = sys.modules[cls.__module__].__dict__
    return {
        f.name: eval(f.type, dict(vars(typing)), dict(namespace)) if isinstance(f.type, str) else f.type
        for f in dataclasses.fields(cls)
    }


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` where that is lossless (int -> float), else _INVALID."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for alternative in typing.get_args(hint):
            result = _coerce(value, alternative)
            if result is not _INVALID:
                return result
        return _INVALID
    if origin is Literal:
        return value if value in typing.get_args(hint) and not isinstance(value, bool) else _INVALID
    if hint is type(None):
        return value if value is None else _INVALID
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:  # numpy's integers too (a sweep over np.arange)
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return int(value) if ok else _INVALID
    if hint is float:  # NaN and infinities are no option's value (a NaN compares false)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            return _INVALID
        # numpy's float32 0.9 is 0.8999999761…: the number written is the shortest decimal
        return float(str(value)) if hasattr(value, "dtype") else float(value)
    if hint is str:
        return value if isinstance(value, str) else _INVALID
    return value  # types we do not check (callables and the like)


def _describe(hint: Any, short: bool = False) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return ("|" if short else " or ").join(_describe(a, short) for a in typing.get_args(hint))
    if origin is Literal:
        if short:
            return "|".join(str(a) for a in typing.get_args(hint))
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not value.replace("-", "").replace("_", "").isalnum():
        return repr(value)
    return str(value)
