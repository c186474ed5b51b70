"""Elementwise ops: channels pass position by position. Operands that both carry channels join
their atoms where they meet (a residual add); an untracked operand may only broadcast along the
channel dims. A constant is computed with the op itself on one value per channel."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from chop.passes.analysis.flow.rule import (
    Const,
    Moved,
    Rule,
    Step,
    Unsupported,
    aten,
    packet,
    register,
    shape_of,
    unknown,
)

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk

# values pass unchanged (dropout: constants are computed in eval mode)
register(aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.clone, aten.contiguous,
         aten.alias, aten.detach, aten.lift_fresh_copy, aten._to_copy, aten.to, aten.type_as)(Moved)


class Computed(Rule):
    """An op applied per position: the constant is the op on the operands' constants."""

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        shape = consts[step.inputs[0]][0].shape
        known = torch.ones(shape, dtype=torch.bool)
        args = []
        for a in node.args:
            if isinstance(a, Node):
                value, k = consts[a] if a in consts else unknown(shape)
                known &= k
                args.append(value.clone())  # an in-place op (relu_) must not change its input's
            else:
                args.append(a)
        try:
            value = node.target(*args, **node.kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):  # refuses the tag-space layout
            return unknown(shape)
        if value.shape != shape:
            return unknown(shape)
        return value.float(), known & torch.isfinite(value)


@register(aten.relu, aten.relu6, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.hardtanh,
          aten.hardswish, aten.hardsigmoid, aten.leaky_relu, aten.elu, aten.mish, aten.softplus,
          aten.neg, aten.abs, aten.exp, aten.sqrt, aten.rsqrt, aten.square, aten.erf, aten.sin,
          aten.cos, aten.log)
class Unary(Computed):
    folds = True

    def visit(self, walk: Walk, node: Node) -> None:
        walk.same(node, Step(self, [node.args[0]]))


_THREE = (aten.where, aten.clamp)  # three tensor operands: where's condition, clamp's bounds


@register(aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.maximum, aten.minimum,
          aten.where, aten.masked_fill, aten.clamp, aten.clamp_min, aten.clamp_max)
class Binary(Computed):
    """Tensor operands combined position by position (``where``'s condition, ``masked_fill``'s
    mask and ``clamp``'s tensor bounds included; number bounds are not operands)."""

    folds = True

    def visit(self, walk: Walk, node: Node) -> None:
        ndim = len(shape_of(node))
        tagged, other = [], []
        for a in node.args[:3] if packet(node) in _THREE else node.args[:2]:
            if not isinstance(a, Node):
                continue
            shift = ndim - len(shape_of(a))
            if a in walk.tags:
                t = walk.tags[a]
                tagged.append((a, tuple(d + shift for d in t.dims), t.atoms,
                               tuple(d + shift for d in t.folded)))
            else:
                other.append((a, shift))
        if not tagged:
            raise Unsupported("carries channels in an operand other than the first two")
        tagged.sort(key=lambda t: -len(t[1]))  # the operand with the most channel dims leads
        _, dims, atoms, folded = tagged[0]
        broadcast = False
        for a, d, at, f in tagged[1:]:
            if d != dims:
                at = self.broadcast(a, ndim, d, at, dims, atoms)
                broadcast = True
            if at is None or at.shape != atoms.shape or f != folded:
                raise Unsupported(f"combines channels along {dims} with channels along {d}")
            walk.join(atoms, at)
        for a, shift in other:
            self.untracked(walk, node, a, shift, dims, atoms, folded)
        walk.set(node, dims, atoms, Step(self, [t[0] for t in tagged],
                                         info={"broadcast": broadcast}), folded)

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        if step.info.get("broadcast"):  # tag-space operands of different layouts
            return unknown(consts[step.inputs[0]][0].shape)
        return super().constant(node, step, consts, graph)

    @staticmethod
    def broadcast(a: Node, ndim: int, dims: tuple[int, ...], atoms: torch.Tensor,
                  full: tuple[int, ...], full_atoms: torch.Tensor) -> torch.Tensor | None:
        """``a``'s atoms spread over the layout ``full`` when ``a`` carries channels along some
        of its dims and has size 1 along the others (a head's RMS scaling its vector), else
        None."""
        shape, shift = shape_of(a), ndim - len(shape_of(a))
        missing = [i for i, d in enumerate(full) if d not in dims]
        if not set(dims) <= set(full) or any(
                full[i] - shift >= 0 and shape[full[i] - shift] != 1 for i in missing):
            return None
        for i in missing:
            atoms = atoms.unsqueeze(i)
        return atoms.expand_as(full_atoms)

    @staticmethod
    def untracked(walk: Walk, node: Node, a: Node, shift: int, dims: tuple[int, ...],
                  atoms: torch.Tensor, folded: tuple[int, ...] = ()) -> None:
        """An operand without channels: fine where it broadcasts along the channel dims; a
        parameter varying along the only channel dim is indexed by it (a layer scale, a position
        embedding); a table varying along some channel dims of a multi-dim layout and broadcast
        along the others (rotary cos/sin over heads) keeps those dims whole. Anything else that
        varies along them blocks the channels, which are still followed (so that the LayerNorm
        of a residual stream is seen)."""
        shape = shape_of(a)
        varying = [d for d in dims if d - shift >= 0 and shape[d - shift] != 1]
        if not varying:
            return
        if set(varying) & set(folded):
            raise Unsupported(f"combines channels folded into the batch with {a.name}, which "
                              "varies there")
        name, inner = walk.param_through(a)
        if name is not None and len(dims) == 1:
            dim = dims[0] - shift - inner
            size = (walk.params.get(name, walk.buffers.get(name))).shape
            if 0 <= dim < len(size) and size[dim] == atoms.shape[0]:
                return walk.member(name, dim, atoms, "channel")
        if len(varying) < len(dims):
            return walk.box(atoms, tuple(i for i, d in enumerate(dims) if d not in varying))
        walk.block(atoms, f"{node.name} ({node.target}): combines these channels with {a.name}, "
                          "whose channels are not tracked (e.g. a model input, a constant or a "
                          "reshaped buffer)")
