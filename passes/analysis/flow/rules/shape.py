"""Shape ops move channel positions without changing values: views and reshapes (a channel dim
split into (heads, head_dim) makes each head one unit), transposes, select, slice and expand.
Shrink rewrites the sizes they spell out (view shapes, unflatten sizes, expand sizes, slice
bounds)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sympy
import torch
from torch.fx import Node

from chop.ir.graph import node_arg
from chop.passes.analysis.flow.rule import (
    Cut,
    Rule,
    Step,
    Tag,
    Transfer,
    Unsupported,
    aten,
    packet,
    positive,
    register,
    shape_of,
)

if TYPE_CHECKING:
    from chop.passes.analysis.flow.walk import Walk


@register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
          aten.unsqueeze, aten.view_as, aten.reshape_as)
class Reshape(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        dims, fn, split = reshape_transfer(shape_of(x), shape_of(node), tag)
        atoms = fn([tag.atoms])
        for rows in split:  # a split channel dim: each outer index goes as one unit
            walk.join_rows(atoms, rows)
        walk.set(node, dims, atoms, Step(self, [x], fn))

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if not cut.any(node):
            return
        op = packet(node)
        if op in (aten.view, aten.reshape, aten._unsafe_view):
            shape = list(node.args[1])
            for d, s in cut.sizes(node).items():
                shape[d] = s
            node.update_arg(1, shape)
        elif op is aten.unflatten:
            shape, first = list(node.args[2]), node.args[1] % node.args[0].meta["val"].dim()
            for d, s in cut.sizes(node).items():
                if 0 <= d - first < len(shape):
                    shape[d - first] = s
            node.update_arg(2, shape)


@register(aten.expand)
class Expand(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        shift = len(shape_of(node)) - len(shape_of(x))
        walk.set(node, tuple(d + shift for d in tag.dims), tag.atoms, Step(self, [x]))

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if cut.any(node):
            shape = list(node.args[1])
            for d, s in cut.sizes(node).items():
                if shape[d] != -1:
                    shape[d] = s
            node.update_arg(1, shape)


@register(aten.transpose, aten.permute, aten.t)
class Transpose(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        ndim = len(shape_of(x))
        op = packet(node)
        if op is aten.permute:
            perm = [positive(d, ndim) for d in node.args[1]]
        else:
            d0, d1 = (0, 1) if op is aten.t else (positive(node.args[1], ndim),
                                                      positive(node.args[2], ndim))
            perm = list(range(ndim))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        new = [perm.index(d) for d in tag.dims]
        order = sorted(range(len(new)), key=lambda i: new[i])

        def fn(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0].permute(order)

        walk.set(node, tuple(sorted(new)), fn([tag.atoms]), Step(self, [x], fn))


@register(aten.select)
class Select(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        d = positive(node.args[1], len(shape_of(x)))
        if d in tag.dims:
            raise Unsupported("selects one channel")
        walk.set(node, tuple(e - (e > d) for e in tag.dims), tag.atoms, Step(self, [x]))


@register(aten.slice)
class Slice(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        shape = shape_of(x)
        d = positive(node_arg(node, 1, "dim", 0), len(shape))
        if d not in tag.dims:
            return walk.same(node, Step(self, [x]))
        start, end, step = node_arg(node, 2, "start"), node_arg(node, 3, "end"), node_arg(node, 4, "step", 1)
        if len(tag.dims) != 1 or step != 1 or not all(isinstance(v, (int, type(None)))
                                                      for v in (start, end)):
            raise Unsupported("slices channels with a step, a dynamic bound or a multi-dim layout")
        lo, hi, _ = slice(start, end).indices(int(shape[d]))

        def fn(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0][lo:hi]

        walk.set(node, tag.dims, fn([tag.atoms]), Step(self, [x], fn, {"range": (lo, hi), "dim": d}))

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if "range" in step.info and cut.any(step.inputs[0]):
            (lo, hi), kept = step.info["range"], ~cut.gone(step.inputs[0])
            node.args = (node.args[0], step.info["dim"], int(kept[:lo].sum()), int(kept[:hi].sum()))
            node.kwargs = {}


@register(aten.sym_size, aten._assert_tensor_metadata, aten.sym_numel, aten.sym_stride)
class Sizes(Rule):
    """Reads of a tensor's sizes: refused where they would see a channel dim shrink."""

    def visit(self, walk: Walk, node: Node) -> None:
        op = packet(node)
        if op is aten.sym_size:
            if positive(node.args[1], len(shape_of(node.args[0]))) in walk.first(node).dims:
                raise Unsupported("reads the size of a channel dim")
        elif op is aten._assert_tensor_metadata and node.kwargs.get("size") is not None:
            raise Unsupported("asserts the size of a tensor whose channels may shrink")


def _expr(size: Any) -> sympy.Expr:
    return sympy.Integer(size) if isinstance(size, int) else sympy.sympify(size.node.expr)


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return a == b or sympy.expand(a - b) == 0


def _varies(t: torch.Tensor, dim: int) -> bool:
    return t.shape[dim] > 1 and not bool((t == t.narrow(dim, 0, 1)).all())


def reshape_transfer(
    in_shape: list[Any], out_shape: list[Any], tag: Tag
) -> tuple[tuple[int, ...], Transfer, list[int]]:
    """The output channel dims of a reshape, the transfer, and the output dims whose rows must
    be joined (a channel dim split into several varying dims, e.g. into (heads, head_dim))."""
    pin = [sympy.Integer(1)]
    for s in in_shape:
        pin.append(pin[-1] * _expr(s))
    pout = [sympy.Integer(1)]
    for s in out_shape:
        pout.append(pout[-1] * _expr(s))
    segments, i0, j0 = [], 0, 0
    while i0 < len(in_shape) or j0 < len(out_shape):
        found = None
        for i in range(i0 + 1, len(in_shape) + 1):
            for j in range(j0 + 1, len(out_shape) + 1):
                if _same(pin[i], pout[j]):
                    found = (i, j)
                    break
            if found:
                break
        if found is None:  # trailing size-1 dims
            found = (len(in_shape), len(out_shape))
        segments.append((range(i0, found[0]), range(j0, found[1])))
        i0, j0 = found
    full_in, full_out, tagged_out = [], [], []
    for ins, outs in segments:
        has_tag = any(d in tag.dims for d in ins)
        if has_tag and not all(isinstance(in_shape[d], int) for d in ins):
            raise Unsupported("merges a channel dim with a dynamic dim")
        if has_tag and not all(isinstance(out_shape[d], int) for d in outs):
            raise Unsupported("reshapes a channel dim into a dynamic dim")
        full_in += [in_shape[d] if has_tag else 1 for d in ins]
        full_out += [out_shape[d] if has_tag else 1 for d in outs]
        if has_tag:
            tagged_out.append(list(outs))
    lead = [in_shape[d] if d in tag.dims else 1 for d in range(len(in_shape))]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(lead).expand(full_in).reshape(full_out)

    probe = expand(tag.atoms)
    dims, split = [], []
    for outs in tagged_out:
        varying = [d for d in outs if _varies(probe, d)]
        if not varying:
            varying = [next((d for d in outs if full_out[d] > 1), outs[0])]
        dims += varying
        if len(varying) > 1:
            split.append(len(dims) - len(varying))
    drop = [d for d in range(len(full_out)) if d not in dims]

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        t = expand(ts[0])
        for d in reversed(drop):
            t = t.select(d, 0)
        return t

    return tuple(dims), fn, split
