"""Per-channel constants: which channels of a tensor are the same value for every input, and
that value — computed from the parameters alone, in eval mode.

A conv/linear output channel whose weight row is all zero is the constant ``bias[c]`` (0 without
bias). Channel-wise ops keep it constant: activations and other elementwise ops (computed with
the op itself on one value per channel), BatchNorm in eval mode (its affine map), pooling and
means over other dims, views, cat/split, and attention (a head whose values are constant outputs
that constant: softmax weights sum to 1). An op whose result at a position depends on more than
the channel (average pooling over padding, softmax, layer_norm over other dims…) makes it
unknown. ``shrink`` carries the constant of a removed channel into the next layer's bias.
"""

from __future__ import annotations

import torch
from chop.passes.analysis.coupling import Flow, Step
from torch.fx import Node

from chop.ir.graph import Graph

Const = tuple[torch.Tensor, torch.Tensor]  # (value, known) in tag space


def _rows_zero(weight: torch.Tensor, dim: int) -> torch.Tensor:
    return ~(weight.detach().movedim(dim, 0).reshape(weight.shape[dim], -1) != 0).any(1)


def _tensor(graph: Graph, name: str | None) -> torch.Tensor | None:
    if name is None:
        return None
    try:
        return graph.module.get_parameter(name).detach()
    except AttributeError:
        return graph.module.get_buffer(name).detach()


def _inputs(consts: dict[Node, Const], step: Step, index: int) -> Const:
    node = step.inputs[index]
    if node is None:
        fill = step.fill[index]
        return torch.zeros(fill.shape), torch.zeros(fill.shape, dtype=torch.bool)
    return consts[node]


def _compute(node: Node, consts: dict[Node, Const], shape: torch.Size) -> Const:
    known = torch.ones(shape, dtype=torch.bool)
    args = []
    for arg in node.args:
        if isinstance(arg, Node):
            if arg in consts:
                value, k = consts[arg]
                known &= k
                args.append(value)
            else:
                known &= False
                args.append(torch.zeros(shape))
        else:
            args.append(arg)
    try:
        value = node.target(*args, **node.kwargs)
    except Exception:  # an op that does not accept the tag-space layout: stay safe
        return torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
    if value.shape != shape:
        return torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
    return value.float(), known & torch.isfinite(value)


def channel_constants(graph: Graph, flow: Flow) -> dict[Node, Const]:
    """For every tracked node: the per-position constant value and whether it is known."""
    consts: dict[Node, Const] = {}
    with torch.no_grad():
        for node in graph.module.graph.nodes:
            if node not in flow.tags:
                continue
            step, shape = flow.steps[node], flow.tags[node].atoms.shape
            info = step.info
            if step.kind in ("new", "depthwise"):
                weight = graph.module.get_parameter(info["weight"]).detach()
                bias = _tensor(graph, info["bias"])
                known = _rows_zero(weight, info["dim"])
                value = bias.float().clone() if bias is not None else torch.zeros(shape)
                consts[node] = (value, known)
            elif step.kind == "map":
                pairs = [_inputs(consts, step, i) for i in range(len(step.inputs))]
                value = step.transfer([p[0] for p in pairs])
                known = step.transfer([p[1] for p in pairs])
                consts[node] = (value, known)
            elif step.kind == "compute":
                consts[node] = _compute(node, consts, shape)
            elif step.kind == "norm":
                value, known = consts[step.inputs[0]]
                w, b, mean, var = (_tensor(graph, n) for n in info["names"])
                if mean is None:  # batch statistics: a constant channel normalises to 0
                    value = torch.zeros_like(value)
                else:
                    value = (value - mean) / torch.sqrt(var + info["eps"])
                value = value * (w if w is not None else 1) + (b if b is not None else 0)
                consts[node] = (value, known & torch.isfinite(value))
            else:  # opaque
                consts[node] = (torch.zeros(shape), torch.zeros(shape, dtype=torch.bool))
    return consts
