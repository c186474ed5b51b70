"""Concatenation and splitting along the channels: positions are laid end to end, or cut into
ranges. Channels of an untracked tensor concatenated in get fresh atoms, blocked. A cat along
another dim joins the channels it stacks, constant only where every part is the same constant.
Shrink rewrites the split sizes; a cat follows by itself."""

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
    packet,
    positive,
    register,
    shape_of,
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
        if any(t is not None and t.dims != (d,) for t in tags):  # channels along another dim
            if any(t is None or t.dims != tags[0].dims for t in tags):
                raise Unsupported("concatenates tensors with different channel layouts")
            for t in tags[1:]:
                walk.join(tags[0].atoms, t.atoms)
            return walk.set(node, tags[0].dims, tags[0].atoms, Step(self, tensors, info={"along": d}))
        step = Step(self, [], lambda ts: torch.cat(ts))
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
        walk.set(node, (d,), torch.cat(parts), step)

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        if "along" not in step.info:  # along the channels: positions laid end to end
            return super().constant(node, step, consts, graph)
        (value, known), *others = [consts[t] for t in step.inputs]  # the same channels, stacked
        for v, k in others:
            known = known & k & (v == value)
        return value, known


_PART = Moved()  # an item of a split: positions moved by its range, nothing to rewrite


@register(aten.split, aten.split_with_sizes)
class Split(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        shape = shape_of(x)
        d = positive(node_arg(node, 2, "dim", 0), len(shape))
        if d not in tag.dims:
            count = len(node.meta["val"]) if isinstance(node.meta.get("val"), (list, tuple)) else 0
            walk.parts[node] = [(Tag(tag.dims, tag.atoms), Step(_PART, [x]))] * count
            return
        if len(tag.dims) != 1:
            raise Unsupported("splits a multi-dim channel layout")
        if packet(node) is aten.split_with_sizes:
            sizes = list(node.args[1])
        else:
            n, size = shape[d], node.args[1]
            sizes = [min(size, n - s) for s in range(0, n, size)]
        parts, start = [], 0
        for s in sizes:
            def fn(ts: list[torch.Tensor], lo: int = start, hi: int = start + s) -> torch.Tensor:
                return ts[0][lo:hi]

            parts.append((Tag(tag.dims, fn([tag.atoms])), Step(_PART, [x], fn)))
            start += s
        walk.parts[node] = parts
        walk.steps[node] = Step(self, [x], info={"dim": d, "sizes": sizes})

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        x = step.inputs[0]
        if not cut.any(x):
            return
        kept, sizes, start = ~cut.gone(x), [], 0
        for size in step.info["sizes"]:
            sizes.append(int(kept[start:start + size].sum()))
            start += size
        node.target = aten.split_with_sizes.default
        node.args = (x, sizes, step.info["dim"])
        node.kwargs = {}
