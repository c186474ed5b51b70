"""Normalisations. BatchNorm is per channel: its parameters and running statistics are members,
and in eval mode it maps a constant channel affinely. layer_norm and softmax mix the positions
they normalise over: channels there cannot go (they are blocked but still followed, so what a
normalised residual stream feeds is known), and no constant stays known."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from chop.passes.analysis.flow.rule import (
    Const,
    Cut,
    Rule,
    Step,
    Tag,
    Unsupported,
    aten,
    operand,
    packet,
    positive,
    register,
    shape_of,
    tensor,
    unknown,
)

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk


@register(aten.batch_norm, aten._native_batch_norm_legit_no_training)
class BatchNorm(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x = node.args[0]
        tag = walk.single(x, 1)
        if tag is None:
            raise Unsupported("normalises an untracked tensor with tracked statistics")
        atoms = tag.atoms
        names = [walk.param_of(a) for a in node.args[1:5]]
        for name in names:
            walk.member(name, 0, atoms, "channel")
        legit = packet(node) is aten._native_batch_norm_legit_no_training
        step = Step(self, [x], info={"names": names, "eps": node.args[6 if legit else 7]})
        if legit:  # (out, mean, rstd)
            walk.parts[node] = [(Tag((1,), atoms), step), (None, None), (None, None)]
        else:
            walk.set(node, (1,), atoms, step)

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        value, known = operand(consts, step, 0)
        w, b, mean, var = (tensor(graph, n) for n in step.info["names"])
        if mean is None:  # batch statistics: a constant channel normalises to 0
            value = torch.zeros_like(value)
        else:
            value = (value - mean) / torch.sqrt(var + step.info["eps"])
        value = value * (w if w is not None else 1) + (b if b is not None else 0)
        return value, known & torch.isfinite(value)


@register(aten.group_norm)
class GroupNorm(Rule):
    """GroupNorm with one channel per group (an instance norm) is per channel: its weight and
    bias are members, the group count follows the cut, and a constant channel normalises to 0
    (its output is the bias). With wider groups a channel's statistics span its group: blocked
    (still followed)."""

    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.single(node.args[0], 1)
        if tag is None:
            raise Unsupported("normalises an untracked tensor with tracked parameters")
        names = [walk.param_of(a) for a in node.args[2:4]]
        if node.args[1] != tag.atoms.shape[0]:
            walk.block(tag.atoms, f"{node.name} ({node.target}): group_norm normalises over these "
                                  "channels (several per group): removing one changes the others")
        for name in names:
            walk.member(name, 0, tag.atoms, "channel")
        walk.set(node, (1,), tag.atoms, Step(self, [x], info={"names": names}))

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        value, known = operand(consts, step, 0)
        if node.args[1] != value.shape[0]:
            return unknown(value.shape)
        w, b = (tensor(graph, n) for n in step.info["names"])
        value = torch.zeros_like(value) * (w if w is not None else 1) + (b if b is not None else 0)
        return value, known

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        x = step.inputs[0]
        if cut.any(x) and node.args[1] == cut.gone(x).shape[0]:
            node.update_arg(1, int((~cut.gone(x)).sum()))


class Mixing(Rule):
    """Channels pass unchanged, but a constant does not stay known."""

    folds = True

    def mixed(self, node: Node) -> list[int]:
        """The dims the op normalises over (none of them may carry channels)."""
        raise NotImplementedError

    def visit(self, walk: Walk, node: Node) -> None:
        tag = walk.tag(node.args[0])
        if tag is not None and set(self.mixed(node)) & set(tag.dims):
            # blocked, but still followed: what it feeds (a residual stream) says why it stays
            walk.block(tag.atoms, f"{node.name} ({node.target}): {packet(node).__name__} "
                                  "normalises over these channels: removing one changes the others")
        walk.same(node, Step(self, [node.args[0]]))

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        return unknown(consts[step.inputs[0]][0].shape)


@register(aten.layer_norm)
class LayerNorm(Mixing):
    def mixed(self, node: Node) -> list[int]:
        ndim = len(shape_of(node.args[0]))
        return list(range(ndim - len(node.args[1]), ndim))


@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
class Softmax(Mixing):
    def mixed(self, node: Node) -> list[int]:
        return [positive(node.args[1], len(shape_of(node.args[0])))]
