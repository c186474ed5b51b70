"""The pass manager: parse a pipeline, check it, run it pass by pass.

A pipeline is a string, one pass or a list of passes (objects, or names/strings)::

    "snip{batches=2}, mask{sparsity=0.9, scope=global}, fold"

Option values in a string are TOML-like: ``true``/``false``, integers, floats, and strings, bare
(``scope=global``) or quoted (``include='layer\\.[0-3]'``; quote anything with ``,{}=`` or spaces).

Before anything runs, :class:`PassManager` checks that it was given a traced graph, that every
key a pass ``requires`` is carried by the graph already or provided by an earlier pass (otherwise
it names the passes that provide it), and that a graph without parameters is not given passes
that score or prune weights. While running it times each pass, lints the graph after each one
(the fx graph when the pass edited it, every metadata entry when it reports a modification,
else the entries it provides; not again after a pass that ran and was linted on the graph as
it is, which a training loop's repeated runs pay otherwise),
records a :class:`~chop.ir.graph.PassRecord` in ``graph.history``, and wraps failures with the
pass name, the passes before it and the node the pass was working on. Python's cyclic garbage
collector is paused while the passes run (:func:`~chop.ir.graph.gc_paused`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from chop.errors import (
    ChopError,
    InternalError,
    MissingMetadataError,
    PassError,
    PipelineError,
    TraceError,
)
from chop.ir import meta
from chop.ir.graph import Graph, PassRecord, gc_paused
from chop.pipeline import registry
from chop.pipeline.pass_base import Context, Pass

log = logging.getLogger("chop")

_TOKEN = re.compile(
    r"""\s*(?:(?P<quoted>"[^"]*"|'[^']*')|(?P<punct>[{}=,])|(?P<bare>[^\s{}=,"']+))"""
)


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """``(kind, text, column)`` tokens of a pipeline string."""
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _syntax(text, pos, "an unterminated quote")
        kind = match.lastgroup or "bare"
        tokens.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return tokens


def _syntax(text: str, column: int, found: str, expected: str = "") -> PipelineError:
    want = f"expected {expected}, found {found}" if expected else f"found {found}"
    return PipelineError(
        f"cannot parse pipeline at column {column + 1}: {want}\n  {text}\n  {' ' * column}^\n"
        "Write passes as name{option=value, ...} separated by commas, e.g. "
        "\"snip{batches=2}, mask{sparsity=0.9, scope=global}, fold\"."
    )


def _value(kind: str, text: str) -> Any:
    if kind == "quoted":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string into pass objects."""
    return list(_parsed(text))


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> tuple[Pass, ...]:
    """The passes of a pipeline string; remembered, since passes are immutable and a training
    loop may run the same string at every step."""
    tokens = _tokens(text) + [("end", "the end", len(text))]
    passes, i = [], 0

    def expect(kinds: tuple[str, ...], texts: tuple[str, ...] | None, what: str) -> tuple:
        nonlocal i
        kind, value, column = tokens[i]
        if kind not in kinds or (texts is not None and value not in texts):
            shown = "the end" if kind == "end" else repr(value)
            raise _syntax(text, column, shown, what)
        i += 1
        return tokens[i - 1]

    if tokens[0][0] == "end":
        raise PipelineError("the pipeline is empty; name at least one pass, e.g. \"snip, mask\"")
    while True:
        _, name, column = expect(("bare",), None, "a pass name")
        other = next((k for k, c in enumerate(name) if c in ";|&"), None)
        if other is not None:
            raise _syntax(text, column + other, repr(name[other]), "',' between passes")
        options: dict[str, Any] = {}
        if tokens[i][1] == "{" and tokens[i][0] == "punct":
            i += 1
            while not (tokens[i][0] == "punct" and tokens[i][1] == "}"):
                _, key, at = expect(("bare",), None, "an option name")
                if key in options:
                    raise _syntax(text, at, f"{key!r} a second time", "each option once")
                expect(("punct",), ("=",), "'='")
                kind, raw, _ = expect(("bare", "quoted"), None, "a value")
                options[key] = _value(kind, raw)
                if tokens[i][1] != "}":
                    expect(("punct",), (",",), "',' or '}'")
            i += 1
        passes.append(registry.get(name).from_options(options))
        kind, value, _ = expect(("punct", "end"), (",", "the end"), "',' or the end")
        if kind == "end":
            return tuple(passes)


def as_passes(pipeline: str | Pass | Sequence[Pass | str]) -> list[Pass]:
    """Normalise any accepted pipeline form to a list of pass objects."""
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline)
    if isinstance(pipeline, Pass):
        return [pipeline]
    if isinstance(pipeline, type) and issubclass(pipeline, Pass):
        return [pipeline()]
    if not isinstance(pipeline, Sequence):
        raise PipelineError(
            f"a pipeline is a string, a pass, or a list of passes; got {type(pipeline).__name__}"
        )
    passes: list[Pass] = []
    for item in pipeline:
        if isinstance(item, (str, Pass)) or (isinstance(item, type) and issubclass(item, Pass)):
            passes += as_passes(item)
        else:
            raise PipelineError(
                f"pipeline items must be pass objects or strings; got {type(item).__name__}: "
                f"{item!r}"
            )
    if not passes:
        raise PipelineError("the pipeline is empty; name at least one pass, e.g. \"snip, mask\"")
    return passes


def carried(graph: Graph) -> set[str]:
    """The ``node.meta["chop"]`` keys some weight node of ``graph`` already carries."""
    keys: set[str] = set()
    for node in graph.weight_nodes():
        keys.update(node.meta.get("chop", {}))
    return keys


def invalidate(graph: Graph, p: Pass) -> list[str]:
    """Drop the analysis keys that pass ``p`` (which changed the graph) does not preserve, from
    every weight node and from the graph-level store; returns the keys dropped."""
    if p.preserves == "all":
        return []
    stale = [k for k in meta.ANALYSES if k not in p.preserves and k not in p.provides]
    dropped = set()
    for node in graph.weight_nodes():
        entry = node.meta.get("chop", {})
        for key in stale:
            if entry.pop(key, None) is not None:
                dropped.add(key)
    store = graph.module.meta.get("chop", {})
    for key in stale:
        if store.pop(key, None) is not None:
            dropped.add(key)
    return sorted(dropped)


class PassManager:
    """Runs a list of passes on graphs; see the module doc for what it checks and records."""

    def __init__(self, pipeline: str | Pass | Sequence[Pass | str]):
        self.passes = as_passes(pipeline)

    def check(self, graph: Graph | None = None) -> None:
        """Raise :class:`MissingMetadataError` if a pass needs a key that neither ``graph``
        carries nor an earlier pass provides (no graph: check the pipeline on its own, as for
        a freshly traced model)."""
        if not any(p.requires for p in self.passes):
            return  # nothing is needed, so nothing can be missing (a scoring pass alone)
        available = carried(graph) if graph is not None else set()
        for index, p in enumerate(self.passes):
            for key in p.requires:
                if key not in available:
                    before = [q.name for q in self.passes[:index]]
                    providers = registry.providers(key)
                    fix = (f"Run one of {', '.join(providers)} before it, e.g. "
                           f"\"{providers[0]}, {p.name}\"." if providers else
                           f"No registered pass provides {key!r}: add the pass that writes it.")
                    raise MissingMetadataError(
                        f"pass {p.name!r} needs {key!r}, which the graph does not carry and no "
                        f"earlier pass in the pipeline provides "
                        f"(passes before it: {', '.join(before) or 'none'}). {fix}"
                    )
            available.update(p.provides)
            if p.preserves != "all":
                available = {k for k in available
                             if k not in meta.ANALYSES or k in p.preserves or k in p.provides}

    def data_batches(self) -> int:
        """The most ``(inputs, targets)`` batches any pass of the pipeline reads."""
        return max((p.data_batches() for p in self.passes), default=0)

    @gc_paused()
    def run(
        self,
        graph: Graph,
        data: Iterable | None = None,
        loss: Callable[[Any, Any], Any] | None = None,
        *,
        track: Callable[[Iterable, int | None, str], Iterable] | None = None,
        on_pass: Callable[[Pass, int, int], None] | None = None,
        shared_data: bool = False,
        verify: bool = True,
    ) -> Graph:
        """Run every pass on ``graph`` in order and return it.

        Args:
            graph: the graph, edited in place.
            data: ``(inputs, targets)`` batches for passes that need data (e.g. ``snip``).
                A one-pass iterator (a generator) is read once, as many batches as the
                pipeline's passes need, so every pass reads the same batches, as from a list.
            loss: ``loss(outputs, targets)``; None means cross-entropy.
            track: progress wrapper for long loops (see :class:`~chop.pipeline.pass_base.Context`).
            on_pass: called as ``on_pass(pass, index, count)`` before each pass starts.
            shared_data: every rank of a process group was given the same ``data`` (see
                :class:`~chop.pipeline.pass_base.Context`).
            verify: check the pipeline against the graph before and lint the graph after each
                pass, except after a pass that already ran here, linted, on the graph as it is
                now (its structure unchanged since: a Pruner's step, iterative scoring). False
                skips both; failures are still wrapped and every pass still recorded.
        """
        if not isinstance(graph, Graph):
            raise TraceError(
                f"chop.run needs a chop.Graph, got a {type(graph).__name__}; trace the model "
                "first: graph = chop.trace(model, example_inputs), then chop.run(graph, ...)"
            )
        if verify:
            self.check(graph)
        weighted = [p.name for p in self.passes if p.requires or p.provides]
        if verify and weighted and not graph.weight_nodes():
            raise PassError(
                f"{graph.name} has no parameters, so pass {weighted[0]!r} has no weight to "
                "score or prune; trace the model that holds the weights (a program exported "
                "with its weights as inputs has none)"
            )
        if isinstance(data, Iterator):  # one pass over it: every pass reads the same batches
            data = list(itertools.islice(data, max(self.data_batches(), 1)))
        ctx = Context(data=data, loss=loss, shared_data=shared_data)
        if track is not None:
            ctx.track = track
        for index, p in enumerate(self.passes):
            if on_pass is not None:
                on_pass(p, index, len(self.passes))
            ctx.node = None
            start = time.perf_counter()
            # a pass linted after its last run on this very graph (memo() is emptied when the
            # graph is edited) is not linted again, unless it reshapes parameters
            linted = ("linted", type(p))
            lint = verify and (p.reshapes or linted not in graph.memo())
            grad = torch.is_grad_enabled()  # a graph's no_grad block that raises keeps it off
            try:
                structure = graph.structure() if lint else None
                result = p.apply(graph, ctx)
                if result.modified:
                    invalidate(graph, p)
                # what cannot have changed is not checked again: the fx graph unless the pass
                # edited it, the entries the pass does not provide unless it modified the graph
                if lint:
                    graph.lint(None if result.modified else p.provides,
                               structure=graph.structure() != structure)
                    graph.memo()[linted] = True
            except Exception as e:
                wrapped = _wrap(e, p, ctx)
                if wrapped is e:
                    raise
                raise wrapped from e
            finally:
                torch.set_grad_enabled(grad)
            seconds = time.perf_counter() - start
            graph.history.append(PassRecord(p.name, p.options(), seconds, result.modified,
                                            result.info, reshaped=p.reshapes))
            log.info("%s: %.3fs%s", p, seconds, "" if result.modified else " (no change)")
            if p.acts_on_masks and not result.modified:
                later = next((q.name for q in self.passes[index + 1:] if "mask" in q.provides),
                             None)
                if later is not None:  # e.g. "snip, shrink, mask": shrink found nothing to do
                    log.warning("pass %r changed nothing: it ran before %r, which makes the "
                                "masks it acts on; put it after, e.g. \"snip, mask, %s\"",
                                p.name, later, p.name)
                elif not any("mask" in meta.entries(n) for n in graph.weight_nodes()):
                    log.warning("pass %r changed nothing: the graph has no masks for it to act "
                                "on; run a criterion and mask before it, e.g. \"snip, "
                                "mask{granularity=channel}, %s\"", p.name, p.name)
            ctx.before.append(p.name)
        return graph


def _wrap(error: Exception, p: Pass, ctx: Context) -> Exception:
    """``error`` with the pass, the passes before it and the node in front of its message: the
    same type for chop's own errors (user mistakes and chop's internal checks), an
    :class:`InternalError` for anything else (a bug). Chained to the original by the caller."""
    where = f"pass {p.name!r}"
    where += f" (after the following passes: {', '.join(ctx.before)})" if ctx.before else ""
    where += f" while processing node {ctx.node.name} ({ctx.node.target})" if ctx.node else ""
    if isinstance(error, (ChopError, InternalError)):
        try:
            wrapped: Exception = type(error)(f"{where}: {error}")
        except TypeError:  # a subclass with another constructor: keep it as it is
            return error
    else:
        wrapped = InternalError(f"{where} failed: {type(error).__name__}: {error}")
    wrapped.pass_name = p.name  # type: ignore[attr-defined]
    return wrapped


def run(
    graph: Graph,
    pipeline: str | Pass | Sequence[Pass | str],
    data: Iterable | None = None,
    loss: Callable[[Any, Any], Any] | None = None,
    *,
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
    on_pass: Callable[[Pass, int, int], None] | None = None,
    shared_data: bool = False,
    verify: bool = True,
) -> Graph:
    """Run ``pipeline`` on ``graph``; see :class:`PassManager`. Returns ``graph``."""
    return PassManager(pipeline).run(graph, data, loss, track=track, on_pass=on_pass,
                                     shared_data=shared_data, verify=verify)
