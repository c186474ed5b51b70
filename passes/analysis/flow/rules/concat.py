"""Concatenation and splitting along the channels: positions are laid end to end, or cut into
ranges (``split``, ``chunk``, ``unbind``). Channels of an untracked tensor concatenated in get
fresh atoms, blocked. A cat along another dim joins the channels it stacks, constant only where
every part is the same constant; a parameter stacked in (a class token) becomes a per-channel
member. In a multi-dim layout (heads × head_dim) the indexed dim never shrinks: its units are
whole hyperplanes along another dim (whole heads). Shrink rewrites the split sizes; a cat
follows by itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from chop.ir.graph import node_arg
from chop.passes.analysis.flow.rule import (
    Const,
    Cut,
    Moved,
    Rule,
    Step,
    Tag,
    Unsupported,
    aten,
    fixed_along,
    packet,
    positive,
    register,
    shape_of,
    unknown,
)

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk


@register(aten.cat)
class Cat(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        tensors = list(node.args[0])
        d = positive(node_arg(node, 1, "dim", 0), len(shape_of(node)))
        tags = [walk.tag(t) for t in tensors]
        present = [t for t in tags if t is not None]
        if all(d not in t.dims for t in present):  # channels along another dim: stacked
            return self.stacked(walk, node, tensors, tags, d)
        if any(t.dims != present[0].dims for t in present):
            raise Unsupported("concatenates tensors with different channel layouts")
        dims = present[0].dims
        axis = dims.index(d)
        if len(dims) > 1:
            if len(present) != len(tags):
                raise Unsupported("concatenates an untracked tensor into a multi-dim channel layout")
            for t in present:
                fixed_along(walk, t, d)
        step = Step(self, [], lambda ts: torch.cat(ts, axis))
        parts = []
        for i, (t, tag) in enumerate(zip(tensors, tags)):
            if tag is None:
                size = shape_of(t)[d]
                if not isinstance(size, int):
                    raise Unsupported("concatenates a tensor of dynamic size along the channels")
                fresh = walk.new_atoms(size, f"{t.name} (untracked)")
                walk.block(fresh, f"{node.name}: channels of {t.name} are concatenated in but "
                                  "come from a tensor chop cannot shrink")
                step.fill[i] = fresh
                parts.append(fresh)
                step.inputs.append(None)
            else:
                parts.append(tag.atoms)
                step.inputs.append(t)
        walk.set(node, dims, torch.cat(parts, axis), step)

    def stacked(self, walk: Walk, node: Node, tensors: list, tags: list[Tag | None], d: int) -> None:
        first = next(t for t in tags if t is not None)
        inputs = []
        for t, tag in zip(tensors, tags):
            if tag is None:
                name, shift = walk.param_through(t)
                if name is None or len(first.dims) != 1:
                    raise Unsupported("concatenates tracked channels with an untracked tensor")
                walk.member(name, first.dims[0] - shift, first.atoms, "channel")
                continue
            if tag.dims != first.dims:
                raise Unsupported("concatenates tensors with different channel layouts")
            walk.join(first.atoms, tag.atoms)
            inputs.append(t)
        info = {"along": d, "partial": len(inputs) != len(tensors)}
        walk.set(node, first.dims, first.atoms, Step(self, inputs, info=info))

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        if "along" not in step.info:  # along the channels: positions laid end to end
            return super().constant(node, step, consts, graph)
        (value, known), *others = [consts[t] for t in step.inputs]  # the same channels, stacked
        if step.info["partial"]:  # a parameter stacked in: its values are not constants here
            return unknown(value.shape)
        for v, k in others:
            known = known & k & (v == value)
        return value, known


_PART = Moved()  # an item of a split: positions moved by its range, nothing to rewrite


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind)
class Split(Rule):
    """``split``/``chunk``: ranges of the channels; ``unbind``: one item per index of a dim that
    must then not be a channel dim of a single-dim layout."""

    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        shape = shape_of(x)
        op = packet(node)
        d = positive(node_arg(node, 1 if op is aten.unbind else 2, "dim", 0), len(shape))
        values = node.meta.get("val")
        if not isinstance(values, (list, tuple)):
            raise Unsupported("its results' shapes are unknown")
        if d not in tag.dims:
            if op is aten.unbind:
                dims = tuple(e - (e > d) for e in tag.dims)
                walk.parts[node] = [(Tag(dims, tag.atoms), Step(_PART, [x]))] * len(values)
            else:
                walk.parts[node] = [(Tag(tag.dims, tag.atoms), Step(_PART, [x]))] * len(values)
            return
        axis = tag.dims.index(d)
        if len(tag.dims) > 1:
            fixed_along(walk, tag, d)
        elif op is aten.unbind:
            raise Unsupported("unbinds the channels one by one")
        parts, start = [], 0
        sizes = [1] * len(values) if op is aten.unbind else [int(v.shape[d]) for v in values]
        for s in sizes:
            if op is aten.unbind:
                def fn(ts: list[torch.Tensor], i: int = start) -> torch.Tensor:
                    return ts[0].select(axis, i)

                dims = tuple(e - (e > d) for e in tag.dims if e != d)
            else:
                def fn(ts: list[torch.Tensor], lo: int = start, n: int = s) -> torch.Tensor:
                    return ts[0].narrow(axis, lo, n)

                dims = tag.dims
            parts.append((Tag(dims, fn([tag.atoms])), Step(_PART, [x], fn)))
            start += s
        walk.parts[node] = parts
        multi = len(tag.dims) > 1  # the indexed dim never shrinks there: nothing to rewrite
        walk.steps[node] = Step(self, [x], info={"dim": d, "sizes": sizes, "fixed": multi})

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        x = step.inputs[0]
        if step.info.get("fixed", True) or not cut.any(x):
            return
        kept, sizes, start = ~cut.gone(x), [], 0
        for size in step.info["sizes"]:
            sizes.append(int(kept[start:start + size].sum()))
            start += size
        node.target = aten.split_with_sizes.default
        node.args = (x, sizes, step.info["dim"])
        node.kwargs = {}
