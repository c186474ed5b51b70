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
    fixed_along,
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
    folds = True

    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        dims, fn, folded = reshape_transfer(shape_of(x), shape_of(node), tag)
        op = packet(node)
        spelt = {aten.view: 1, aten.reshape: 1, aten._unsafe_view: 1, aten.unflatten: 2}
        if folded and (op in (aten.view_as, aten.reshape_as) or op in spelt and (
                len(folded) > 1 or -1 in list(node.args[spelt[op]]))):
            raise Unsupported("folds channels into the batch dim in a way chop cannot respell")
        # a channel dim split into several (heads, head_dim): the walk keeps the kept positions
        # a box when it settles (each head one unit, unless the ops after it chose another axis)
        walk.set(node, dims, fn([tag.atoms]), Step(self, [x], fn, {"folded": folded}), folded)

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if not cut.any(node):
            return
        op = packet(node)
        # a folded dim (batch × channels) is spelt -1: the batch part is dynamic
        sizes = {d: -1 if d in step.info["folded"] else s for d, s in cut.sizes(node).items()}
        if op in (aten.view, aten.reshape, aten._unsafe_view):
            shape = list(node.args[1])
            for d, s in sizes.items():
                shape[d] = s
            node.update_arg(1, shape)
        elif op is aten.unflatten:
            shape, first = list(node.args[2]), node.args[1] % node.args[0].meta["val"].dim()
            for d, s in sizes.items():
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
    folds = True

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

        walk.set(node, tuple(sorted(new)), fn([tag.atoms]), Step(self, [x], fn),
                 tuple(sorted(perm.index(d) for d in tag.folded)))


@register(aten.select)
class Select(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        shape = shape_of(x)
        d = positive(node.args[1], len(shape))
        if d not in tag.dims:
            return walk.set(node, tuple(e - (e > d) for e in tag.dims), tag.atoms, Step(self, [x]))
        if len(tag.dims) == 1:
            raise Unsupported("selects one channel")
        axis, i = tag.dims.index(d), positive(node.args[2], int(shape[d]))
        fixed_along(walk, tag, d)  # q, k and v of a fused projection: that dim never shrinks

        def fn(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0].select(axis, i)

        walk.set(node, tuple(e - (e > d) for e in tag.dims if e != d), fn([tag.atoms]),
                 Step(self, [x], fn))


@register(aten.slice, aten.narrow)
class Slice(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        shape = shape_of(x)
        d = positive(node_arg(node, 1, "dim", 0), len(shape))
        if d not in tag.dims:
            return walk.same(node, Step(self, [x]))
        if packet(node) is aten.narrow:
            start, length = node.args[2], node.args[3]
            end, step = (start + length if isinstance(start, int) and isinstance(length, int)
                         else None), 1
        else:
            start, end = node_arg(node, 2, "start"), node_arg(node, 3, "end")
            step = node_arg(node, 4, "step", 1)
        if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
            raise Unsupported("slices channels with a step or a dynamic bound")
        lo, hi, _ = slice(start, end).indices(int(shape[d]))
        hi = max(hi, lo)
        axis = tag.dims.index(d)
        if len(tag.dims) > 1:  # rotate_half, partial rotary: head_dim never shrinks
            fixed_along(walk, tag, d)

        def fn(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0].narrow(axis, lo, hi - lo)

        info = {"range": (lo, hi), "dim": d} if len(tag.dims) == 1 else {}
        walk.set(node, tag.dims, fn([tag.atoms]), Step(self, [x], fn, info))

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if "range" in step.info and cut.any(step.inputs[0]):
            (lo, hi), kept = step.info["range"], ~cut.gone(step.inputs[0])
            node.target = aten.slice.Tensor
            node.args = (node.args[0], step.info["dim"], int(kept[:lo].sum()), int(kept[:hi].sum()))
            node.kwargs = {}


@register(aten.roll, aten.flip)
class Roll(Rule):
    """Rolls and flips along dims that carry no channels (Swin's shifted windows): values move
    between positions of the same channel."""

    folds = True

    def visit(self, walk: Walk, node: Node) -> None:
        x, tag = node.args[0], walk.first(node)
        ndim = len(shape_of(x))
        dims = node_arg(node, 2 if packet(node) is aten.roll else 1, "dims", [])
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims or any(positive(d, ndim) in tag.dims for d in dims):
            raise Unsupported("moves values across the channels")
        walk.same(node, Step(self, [x]))


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
) -> tuple[tuple[int, ...], Transfer, tuple[int, ...]]:
    """The output channel dims of a reshape, the transfer, and the output dims that fold
    channels into the batch (``[seq, batch, heads·hd] -> [seq, batch·heads, hd]``).

    Each input dim is a factor, a folded one two (the dynamic batch, outer; the channels,
    inner). Factors and output dims are matched into segments of equal products; in a segment
    that holds channels, dynamic factors must come first on both sides, so the channels reshape
    as a static block and at most the segment's first output dim folds them into the batch."""
    factors: list[tuple[sympy.Expr, int | None]] = []  # (size, tag axis)
    for d, size in enumerate(in_shape):
        axis = tag.dims.index(d) if d in tag.dims else None
        if d in tag.folded:
            inner = tag.atoms.shape[axis]
            factors += [(sympy.simplify(_expr(size) / inner), None), (sympy.Integer(inner), axis)]
        else:
            factors.append((_expr(size), axis))
    pin = [sympy.Integer(1)]
    for size, _ in factors:
        pin.append(pin[-1] * size)
    pout = [sympy.Integer(1)]
    for s in out_shape:
        pout.append(pout[-1] * _expr(s))
    segments, i0, j0 = [], 0, 0
    while i0 < len(factors) or j0 < len(out_shape):
        found = None
        for i in range(i0 + 1, len(factors) + 1):
            for j in range(j0 + 1, len(out_shape) + 1):
                if _same(pin[i], pout[j]):
                    found = (i, j)
                    break
            if found:
                break
        if found is None:  # trailing size-1 dims
            found = (len(factors), len(out_shape))
        segments.append((range(i0, found[0]), range(j0, found[1])))
        i0, j0 = found
    full_in, full_out, tagged_out, folding = [], [], [], set()
    for ins, outs in segments:
        has_tag = any(factors[f][1] is not None for f in ins)
        dynamic = [f for f in ins if not factors[f][0].is_Integer]
        if has_tag and dynamic != list(ins[:len(dynamic)]):
            raise Unsupported("merges a channel dim with a dynamic dim inside it")
        if has_tag and any(factors[f][1] is not None for f in dynamic):
            raise Unsupported("merges a channel dim with a dynamic dim")
        full_in += [int(factors[f][0]) if has_tag and f not in dynamic else 1 for f in ins]
        for k, j in enumerate(outs):
            size = _expr(out_shape[j])
            if not has_tag:
                full_out.append(1)
            elif size.is_Integer:
                full_out.append(int(size))
            elif k == 0 and dynamic:  # the batch, times some of the channels
                inner = sympy.simplify(size / sympy.Mul(*[factors[f][0] for f in dynamic]))
                if not inner.is_Integer:
                    raise Unsupported("folds channels into a dynamic dim unevenly")
                full_out.append(int(inner))
                folding.add(j)
            else:
                raise Unsupported("reshapes a channel dim into a dynamic dim")
        if has_tag:
            tagged_out.append(list(outs))
    lead = [tag.atoms.shape[axis] if axis is not None else 1 for _, axis in factors]

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(lead).expand(full_in).reshape(full_out)

    probe = expand(tag.atoms)
    dims = []
    for outs in tagged_out:
        varying = [d for d in outs if _varies(probe, d)]
        if not varying:
            varying = [next((d for d in outs if full_out[d] > 1), outs[0])]
        dims += varying
    drop = [d for d in range(len(full_out)) if d not in dims]

    def fn(ts: list[torch.Tensor]) -> torch.Tensor:
        t = expand(ts[0])
        for d in reversed(drop):
            t = t.select(d, 0)
        return t

    return tuple(dims), fn, tuple(d for d in dims if d in folding)
