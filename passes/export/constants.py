"""Per-channel constants: which channels of a tensor are the same value for every input, and
that value — computed from the parameters alone, in eval mode.

A conv/linear output channel whose weight row is all zero is the constant ``bias[c]`` (0 without
bias). Each op's rule (:mod:`chop.passes.analysis.flow`) says how a constant goes through it:
activations and other elementwise ops compute it with the op itself on one value per channel,
BatchNorm in eval mode applies its affine map, pooling, means, views, cat/split and attention
move it, and an op whose result at a position depends on more than the channel (average
pooling over padding, softmax, layer_norm over other dims…) makes it unknown. ``shrink`` carries
the constant of a removed channel into the next layer's bias.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from chop.ir.graph import Graph
from chop.passes.analysis.flow import Flow
from chop.passes.analysis.flow.rule import Const


def channel_constants(graph: Graph, flow: Flow) -> dict[Node, Const]:
    """For every tracked node: the per-position constant value and whether it is known (both in
    tag space, the node's ``flow.tags[node].atoms`` shape)."""
    consts: dict[Node, Const] = {}
    with torch.no_grad():
        for node in graph.module.graph.nodes:
            if node in flow.tags:
                step = flow.steps[node]
                consts[node] = step.rule.constant(node, step, consts, graph)
    return consts
