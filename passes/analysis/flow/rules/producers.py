"""Weight ops (linear, addmm, convolutions): their output channels are fresh atoms, the rows of
the weight; the channels they read index the weight's input dim. A channel whose weight rows are
all zero outputs the constant ``bias[c]``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.fx import Node

from chop.ir.graph import node_arg, set_node_arg
from chop.kernels.reduce import any_nonzero
from chop.passes.analysis.flow.rule import (
    Const,
    Consumer,
    Cut,
    Rule,
    Step,
    Unsupported,
    aten,
    packet,
    register,
    shape_of,
    tensor,
    value_of,
)

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk


class Producer(Rule):
    """The weight layout shrink and the constants analysis ask about."""

    creates = True
    out_dim: ClassVar[int]  # weight dim of the output channels
    in_dim: ClassVar[int]  # weight dim of the input channels
    bias_at: ClassVar[int]  # argument index of the bias (-1: none, so no constant folds in)

    def operands(self, node: Node) -> tuple[Any, Any, Any]:
        """``(input, weight, bias)`` arguments of ``node`` (bias None when absent)."""
        return node.args[0], node.args[1], node_arg(node, self.bias_at, "bias")

    def channel_dim(self, ndim: int) -> int:
        """The output dim that carries channels."""
        raise NotImplementedError

    def reads(self, c: Consumer, weight: torch.Tensor) -> torch.Tensor:
        """Whether each input position of ``c`` is read by a nonzero weight."""
        raise NotImplementedError

    def delta(self, c: Consumer, weight: torch.Tensor, value: torch.Tensor,
              gone: torch.Tensor) -> torch.Tensor:
        """What the input positions ``gone`` (holding constant ``value``) add to each output."""
        raise NotImplementedError

    def set_bias(self, node: Node, bias: Node) -> None:
        set_node_arg(node, self.bias_at, "bias", bias)

    def names(self, walk: Walk, weight: Any, bias: Any) -> tuple[str, str | None]:
        w, b = walk.param_of(weight), walk.param_of(bias)
        if w is None or w not in walk.params or (bias is not None and b is None):
            raise Unsupported("its weight or bias is computed, not a parameter")
        return w, b

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        weight = tensor(graph, step.info["weight"])
        bias = tensor(graph, step.info["bias"])
        others = tuple(d for d in range(weight.dim()) if d != self.out_dim)
        outputs = weight.shape[self.out_dim]
        value = bias.float().clone() if bias is not None else torch.zeros(outputs)
        return value, ~any_nonzero(weight, others)


class Matmul(Producer):
    """Linear and addmm: the input's channel positions meet the weight's input dim."""

    def visit(self, walk: Walk, node: Node) -> None:
        x, weight, bias = self.operands(node)
        w, b = self.names(walk, weight, bias)
        tag = walk.single(x, self.channel_dim(len(shape_of(x))))
        if tag is not None:
            walk.member(w, self.in_dim, tag.atoms, "in")
            walk.consumers.append(Consumer(node, w, x, self, folds=self.bias_at >= 0))
        else:
            walk.untracked(w, self.in_dim, x)
        out = walk.space(w, self.out_dim)
        walk.member(w, self.out_dim, out, "out")
        if bias is not None and value_of(bias) is not None and value_of(bias).shape[-1] == len(out):
            walk.member(b, value_of(bias).dim() - 1, out, "out")
        elif bias is not None:
            raise Unsupported("its bias does not have one entry per output channel")
        ndim = len(shape_of(node))
        walk.set(node, (ndim - 1,), out, Step(self, [], info={"weight": w, "bias": b}))

    def channel_dim(self, ndim: int) -> int:
        return ndim - 1



@register(aten.linear)
class Linear(Matmul):
    out_dim, in_dim, bias_at = 0, 1, 2

    def reads(self, c: Consumer, weight: torch.Tensor) -> torch.Tensor:
        return any_nonzero(weight, 0)

    def delta(self, c: Consumer, weight: torch.Tensor, value: torch.Tensor,
              gone: torch.Tensor) -> torch.Tensor:
        idx = _live(gone, value)  # only the columns that add something
        return weight.detach()[:, idx].double() @ value[idx].double()


class LinearT(Linear):
    """``x @ wᵀ`` written out (Falcon's linear layers): a product of the input with a transpose
    of a ``[out, in]`` weight, and no bias argument (a bias added after it is a per-channel
    add). Not registered: :class:`~.attention.Matmuls` hands such products to it."""

    bias_at = -1

    def operands(self, node: Node) -> tuple[Any, Any, Any]:
        return node.args[0], node.args[1].args[0], None

    def visit(self, walk: Walk, node: Node) -> None:
        seen = node.args[1]
        if set(seen.users) != {node}:
            raise Unsupported(f"its transpose {seen.name} is also read by other ops")
        super().visit(walk, node)
        walk.uses.setdefault(walk.param_of(seen.args[0]), set()).add(seen)  # read through it


LINEAR_T = LinearT()


@register(aten.addmm)
class Addmm(Matmul):
    """``addmm(bias, x, weight)``: the weight is ``[in, out]`` (GPT-2's Conv1D)."""

    out_dim, in_dim, bias_at = 1, 0, 0

    def operands(self, node: Node) -> tuple[Any, Any, Any]:
        return node.args[1], node.args[2], node.args[0]

    def visit(self, walk: Walk, node: Node) -> None:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise Unsupported("addmm with beta/alpha other than 1")
        super().visit(walk, node)

    def channel_dim(self, ndim: int) -> int:
        return 1

    def reads(self, c: Consumer, weight: torch.Tensor) -> torch.Tensor:
        return any_nonzero(weight, 1)

    def delta(self, c: Consumer, weight: torch.Tensor, value: torch.Tensor,
              gone: torch.Tensor) -> torch.Tensor:
        idx = _live(gone, value)
        return value[idx].double() @ weight.detach()[idx].double()


@register(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
class Conv(Producer):
    """Grouped convs join the same relative channel of every group; a depthwise conv (one input
    channel per group) follows its input's channels instead of making new ones. A padded conv
    sees a constant input channel only away from the borders: no exact fold into its bias."""

    out_dim, in_dim, bias_at = 0, 1, 2

    def visit(self, walk: Walk, node: Node) -> None:
        x, weight, bias = self.operands(node)
        if packet(node) is aten.convolution:
            if node.args[6]:
                raise Unsupported("transposed convolution")
            padding, groups = node.args[4], node.args[8]
        else:
            padding, groups = node_arg(node, 4, "padding", 0), node_arg(node, 6, "groups", 1)
        w, b = self.names(walk, weight, bias)
        out_c, in_g = walk.params[w].shape[:2]
        padded = padding == "same" or (not isinstance(padding, str) and any(
            p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding])))
        tag = walk.single(x, 1)
        info = {"weight": w, "bias": b}
        if groups > 1 and in_g == 1 and tag is not None:  # depthwise (channel multiplier k)
            k = out_c // (in_g * groups)
            out = tag.atoms.repeat_interleave(k)
            walk.member(w, 0, out, "channel")
            walk.member(b, 0, out, "channel")
            step = Step(self, [x], lambda ts: ts[0].repeat_interleave(k), {**info, "depthwise": True})
            return walk.set(node, (1,), out, step)
        if tag is not None:
            _join_groups(walk, tag.atoms, groups)  # the same relative index in every group
            walk.member(w, 1, tag.atoms[:in_g], "in")
            walk.consumers.append(Consumer(node, w, x, self, groups, folds=not padded))
        else:
            walk.untracked(w, 1, x)
        out = walk.space(w, 0)
        _join_groups(walk, out, groups)
        walk.member(w, 0, out, "out")
        walk.member(b, 0, out, "out")
        walk.set(node, (1,), out, Step(self, [], info=info))

    def channel_dim(self, ndim: int) -> int:
        return 1

    def reads(self, c: Consumer, weight: torch.Tensor) -> torch.Tensor:
        out_c, in_g = weight.shape[:2]  # over the outputs of a group first: a vectorised pass
        per_group = weight.detach().reshape(c.groups, out_c // c.groups, in_g, -1)
        return any_nonzero(per_group, 1).any(-1).flatten()

    def delta(self, c: Consumer, weight: torch.Tensor, value: torch.Tensor,
              gone: torch.Tensor) -> torch.Tensor:
        out_g, in_g = weight.shape[0] // c.groups, weight.shape[1]
        if c.groups == 1:  # only the columns that add something
            idx = _live(gone, value)
            return weight.detach()[:, idx].flatten(2).sum(2, dtype=torch.float64) @ value[idx].double()
        summed = weight.detach().double().flatten(2).sum(2)  # a constant input meets the whole kernel
        v = _where(gone, value)
        return torch.cat([summed[g * out_g:(g + 1) * out_g] @ v[g * in_g:(g + 1) * in_g]
                          for g in range(c.groups)])

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if step.info.get("depthwise") and cut.any(step.inputs[0]):
            kept = int((~cut.gone(step.inputs[0])).sum())
            if packet(node) is aten.convolution:
                node.update_arg(8, kept)
            else:
                set_node_arg(node, 6, "groups", kept)


def _join_groups(walk: Walk, atoms: torch.Tensor, groups: int) -> None:
    """Join each group's channels of ``atoms`` (a conv's, in group order) with the first
    group's at the same relative index, in one join."""
    if groups > 1:
        per_group = atoms.reshape(groups, -1)
        walk.join(per_group[:1].expand(groups - 1, -1), per_group[1:])


def _live(gone: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The positions that go and hold a nonzero constant."""
    return (gone & (value != 0)).nonzero().flatten()


def _where(gone: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(gone, value.double(), torch.zeros((), dtype=torch.float64))
