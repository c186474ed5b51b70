"""Pooling and reductions over dims that carry no channels: channels pass. A constant channel
stays constant under max, mean and adaptive pooling, not under a sum or an average that counts
padding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.fx import Node

from chop.ir.graph import node_arg
from chop.passes.analysis.flow.rule import (
    Const,
    Rule,
    Step,
    Tag,
    Unsupported,
    aten,
    packet,
    positive,
    register,
    shape_of,
    unknown,
)

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk

_SPATIAL = {aten.max_pool1d: 1, aten.max_pool2d: 2, aten.max_pool3d: 3, aten.avg_pool1d: 1,
            aten.avg_pool2d: 2, aten.avg_pool3d: 3, aten.adaptive_avg_pool1d: 1,
            aten.adaptive_avg_pool2d: 2, aten.adaptive_avg_pool3d: 3, aten.adaptive_max_pool1d: 1,
            aten.adaptive_max_pool2d: 2, aten.max_pool2d_with_indices: 2}


class KeepsConstant(Rule):
    """Moves positions; a constant stays known where ``step.info["exact"]``."""

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        if step.info["exact"]:
            return super().constant(node, step, consts, graph)
        return unknown(step.transfer([consts[step.inputs[0]][0]]).shape)


@register(*_SPATIAL)
class Pool(KeepsConstant):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        op = packet(node)
        if any(d >= len(shape_of(x)) - _SPATIAL[op] for d in tag.dims):
            raise Unsupported("pools over a channel dim")
        exact = True
        if op in (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d):
            padding = node_arg(node, 3, "padding", 0)
            padded = any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
            exact = not padded or not node_arg(node, 5, "count_include_pad", True)
        step = Step(self, [x], info={"exact": exact})
        if op is aten.max_pool2d_with_indices:  # (out, indices)
            walk.parts[node] = [(Tag(tag.dims, tag.atoms), step), (None, None)]
        else:
            walk.set(node, tag.dims, tag.atoms, step)


@register(aten.mean, aten.sum, aten.amax, aten.amin)
class Reduce(KeepsConstant):
    """A reduction over dims without channels passes them. Over some of the channel dims of a
    multi-dim layout, within each position of the others (RMSNorm of each head's vector, as
    Qwen3's and Gemma3's ``q_norm``/``k_norm``), the result depends on whole hyperplanes: those
    go as units (whole heads), and the result carries the remaining dims, each position holding
    an atom of its hyperplane. Over every channel dim, channels cannot go one by one: blocked."""

    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        ndim = len(shape_of(x))
        dims = node_arg(node, 1, "dim", None)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise Unsupported("reduces over every dim, channels included")
        dims = {positive(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        reduced = [i for i, d in enumerate(tag.dims) if d in dims]
        if len(reduced) == len(tag.dims):
            if packet(node) is aten.mean:
                raise Unsupported("normalises over these channels (a mean over them, as in "
                                  "RMSNorm): removing one changes the others")
            raise Unsupported("reduces over a channel dim")
        if reduced:  # each hyperplane along the kept dims goes whole
            walk.box(tag.atoms, tuple(i for i in range(len(tag.dims)) if i not in reduced))
        kept = [d for d in tag.dims if d not in dims]
        out = tuple(kept) if node_arg(node, 2, "keepdim", False) else tuple(
            d - sum(r < d for r in dims) for d in kept)
        index = tuple(0 if i in reduced else slice(None) for i in range(len(tag.dims)))
        exact = packet(node) is not aten.sum and not reduced
        walk.set(node, out, tag.atoms[index], Step(self, [x], transfer=lambda ts: ts[0][index],
                                                   info={"exact": exact}))
