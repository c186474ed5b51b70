"""Gathers. Rows of a 2-D parameter picked by indices (``embedding``; ``index``/``index_select``
along dim 0) give its columns as channels: the hidden size of a token embedding, or one column
per head of a relative position bias table (T5, Swin); a column that is all zero is the constant
0. A tracked tensor indexed along dims that carry no channels (tokens) keeps its channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from chop.kernels.reduce import any_nonzero
from chop.passes.analysis.flow.rule import (
    Const,
    Rule,
    Step,
    Unsupported,
    aten,
    packet,
    positive,
    register,
    shape_of,
    tensor,
)

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk


@register(aten.embedding, aten.index, aten.index_select)
class Gather(Rule):
    creates = True  # a parameter's columns are new channels

    def visit(self, walk: Walk, node: Node) -> None:
        op = packet(node)
        source = node.args[0]
        if op is aten.embedding:
            indices, dim = [node.args[1]], 0
        elif op is aten.index:
            indices, dim = list(node.args[1]), 0
        else:
            indices, dim = [node.args[2]], positive(node.args[1], len(shape_of(source)))
        if any(walk.tag(i) is not None for i in indices):
            raise Unsupported("its indices carry channels")
        tag = walk.tag(source)
        if tag is None:
            name = walk.param_of(source)
            if (name is None or name not in walk.params or walk.params[name].dim() != 2
                    or dim != 0 or len(indices) != 1 or indices[0] is None):
                return  # gathers from a tensor without channels: nothing to follow
            out = walk.space(name, 1)
            walk.member(name, 1, out, "out")
            return walk.set(node, (len(shape_of(node)) - 1,), out,
                            Step(self, [], info={"weight": name}))
        if op is aten.embedding:
            raise Unsupported("looks up rows of a computed table")
        if op is aten.index_select:
            if dim in tag.dims:
                raise Unsupported("picks channels by index")
            return walk.set(node, tag.dims, tag.atoms, Step(self, [source]))
        k = len(indices)
        if any(i is None for i in indices):
            raise Unsupported("indexes after a full slice (x[:, idx])")
        if any(d < k for d in tag.dims):
            raise Unsupported("indexes along a channel dim")
        shift = len(shape_of(node)) - len(shape_of(source))
        walk.set(node, tuple(d + shift for d in tag.dims), tag.atoms, Step(self, [source]))

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        if "weight" not in step.info:
            return super().constant(node, step, consts, graph)
        weight = tensor(graph, step.info["weight"])
        return torch.zeros(weight.shape[1]), ~any_nonzero(weight, 0)
