"""Attention. ``scaled_dot_product_attention`` over per-head views ``[batch, heads, seq,
head_dim]``: a head's q, k and v rows go together (one unit per head) and the output carries v's
layout. Grouped-query attention (``enable_gqa``, or k/v heads repeated by ``expand`` + ``reshape``
before the call) makes a KV head one unit with the query heads that share it. An attention mask
with one bias per head (T5's relative position bias) joins its heads in; one that cannot be
traced to a parameter blocks them. A head whose values are constant outputs that constant
(softmax weights sum to 1).

``matmul``/``bmm`` (or an einsum that is one) between two activations, attention written out
(``q @ kᵀ``, ``probs @ v``), contracts channels only where both sides carry the same ones;
channels along the batch dims (heads) must match on both sides; a row of channels contracted
away is one unit; a product that contracts away every channel it carries (one head's ``q @ kᵀ``)
blocks them, as a sum over channels does. With a parameter as second operand (``x @ W``,
``W`` is ``[in, out]``) it is a weight op like ``addmm`` without bias (no constant folds into
it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node

from chop.ir.graph import node_arg, swaps_last_two
from chop.kernels.reduce import any_nonzero
from chop.passes.analysis.flow.rule import (
    Const,
    Consumer,
    Cut,
    Rule,
    Step,
    Tag,
    Unsupported,
    aten,
    packet,
    register,
    shape_of,
    unknown,
)
from chop.passes.analysis.flow.rules.producers import LINEAR_T, Matmul, _where

if TYPE_CHECKING:
    from chop.ir.graph import Graph
    from chop.passes.analysis.flow.walk import Walk


@register(aten.scaled_dot_product_attention)
class Attention(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        q, k, v = node.args[:3]
        tags = [_per_head(walk, t) for t in (q, k, v)]
        if any(t is None or t.dims != (1, 3) for t in tags):
            raise Unsupported("attention whose q, k and v do not all carry heads along dim 1 and "
                              "head features along dim 3")
        heads, kv_heads = tags[0].atoms.shape[0], tags[1].atoms.shape[0]
        if tags[1].atoms.shape != tags[2].atoms.shape or tags[0].atoms.shape[1] != tags[1].atoms.shape[1]:
            raise Unsupported("attention whose q, k and v heads have different layouts")
        if heads != kv_heads and not (node_arg(node, 7, "enable_gqa", False) and heads % kv_heads == 0):
            raise Unsupported("attention with fewer key/value heads than query heads and no "
                              "enable_gqa")
        rep = heads // kv_heads
        k_atoms, v_atoms = (t.atoms.repeat_interleave(rep, 0) for t in tags[1:])
        mask, uniform = self.mask(walk, node_arg(node, 3, "attn_mask"), heads)
        for h in range(heads):
            parts = [tags[0].atoms[h].flatten(), k_atoms[h].flatten(), v_atoms[h].flatten()]
            head = torch.cat(parts + ([mask[h].reshape(1)] if mask is not None else []))
            walk.join(head[:1].expand_as(head), head)
            walk.heads.update(head.tolist())

        def fn(ts: list[torch.Tensor]) -> torch.Tensor:
            return ts[0].repeat_interleave(rep, 0)

        walk.set(node, (1, 3), v_atoms, Step(self, [v], fn, {"uniform": uniform}))

    @staticmethod
    def mask(walk: Walk, mask: Any, heads: int) -> tuple[torch.Tensor | None, list]:
        """The head atoms of an attention mask that has one bias per head (None if it has
        none), and the sizes to set to 1 in a mask that is the same for every head but spelt
        out per head (T5's zeros); any other per-head mask blocks."""
        if not isinstance(mask, Node):
            return None, []
        shape, tag = shape_of(mask), walk.tag(mask)
        at = len(shape) - 3  # masks broadcast to [batch, heads, query, key]
        if tag is None:
            if at < 0 or shape[at] == 1:
                return None, []
            edits = uniform_along(mask, at)
            if edits is None:
                raise Unsupported("its attention mask has one bias per head, from a tensor chop "
                                  "cannot shrink")
            return None, edits
        if tag.dims != (at,) or tag.atoms.shape[0] != heads:
            raise Unsupported("its attention mask carries channels other than its heads")
        return tag.atoms, []

    def rewrite(self, node: Node, step: Step, cut: Cut) -> None:
        if step.info["uniform"] and cut.any(node):
            for target, index, dim, size in step.info["uniform"]:
                sizes = list(target.args[index])
                sizes[dim] = size
                target.update_arg(index, sizes)


def contract(walk: Walk, ta: Tag | None, tb: Tag | None, sa: list, sb: list
             ) -> tuple[tuple[int, ...], torch.Tensor, tuple[int, ...]]:
    """``a @ b`` for ``a`` ``[*batch, m, k]`` and ``b`` ``[*batch, k, n]`` (tags ``ta``, ``tb``,
    shapes ``sa``, ``sb``): join what the product couples and return the output's ``(dims,
    atoms, folded)``. A product that sums every channel away (one head's ``q @ kᵀ``, ``h · h``)
    is :class:`Unsupported`: its result reads them all, and no weight of the flow stands for
    that read."""
    n = len(sa)
    batch = range(n - 2)
    ka = ta is not None and n - 1 in ta.dims  # contracted dims: a's last, b's second to last
    kb = tb is not None and n - 2 in tb.dims
    if ka != kb:
        raise Unsupported("contracts channels with a tensor that does not carry them")
    folded = set(ta.folded if ta is not None else ()) | set(tb.folded if tb is not None else ())
    if folded - set(batch) or any(t is not None and set(t.folded) != folded & set(t.dims)
                                  for t in (ta, tb)):
        raise Unsupported("multiplies tensors that fold channels into the batch differently")
    reduced = []
    for tag, kdim, other, shape in ((ta, n - 1, tb, sb), (tb, n - 2, ta, sa)):
        if tag is None:
            reduced.append(None)
            continue
        atoms, dims = tag.atoms, list(tag.dims)
        if kdim in dims:
            axis = dims.index(kdim)
            rows = atoms.movedim(axis, -1)
            if len(dims) > 1:  # a row of contracted channels goes as one unit
                flat = rows.reshape(-1, rows.shape[-1])
                walk.join(flat[:, :1].expand_as(flat), flat)
            dims.pop(axis)
            atoms = rows[..., 0]
        for d in dims:
            if d in batch and shape[d] != 1 and (other is None or d not in other.dims):
                raise Unsupported("combines heads with a tensor that does not carry them")
        reduced.append((tuple(dims), atoms))
    if ka:
        ra = ta.atoms.movedim(ta.dims.index(n - 1), -1)
        rb = tb.atoms.movedim(tb.dims.index(n - 2), -1)
        if ra.shape != rb.shape:
            raise Unsupported("contracts channels laid out differently on both sides")
        walk.join(ra, rb)
    dims = sorted({d for r in reduced if r is not None for d in r[0]})
    if not dims:  # only contracted channels: a reduction over them, as sum(dim=channel) is
        raise Unsupported("sums these channels away (its result carries none of them): "
                          "removing one changes the result")
    sizes = [next(r[1].shape[r[0].index(d)] for r in reduced if r is not None and d in r[0])
             for d in dims]
    spread = []
    for r in reduced:
        if r is None:
            continue
        view = [sizes[i] if d in r[0] else 1 for i, d in enumerate(dims)]
        spread.append(r[1].reshape(view).expand(sizes))
    for s in spread[1:]:
        walk.join(spread[0], s)
    if len(spread) > 1 and any(d in batch for d in dims):  # attention: per-head products
        walk.heads.update(torch.cat([s.flatten() for s in spread]).tolist())
    return tuple(dims), spread[-1].contiguous(), tuple(d for d in dims if d in folded)


def _permute(tag: Tag | None, perm: list[int]) -> Tag | None:
    """``tag`` of a tensor permuted so that its new dim i is its old dim ``perm[i]``."""
    if tag is None:
        return None
    new = [perm.index(d) for d in tag.dims]
    order = sorted(range(len(new)), key=lambda i: new[i])
    return Tag(tuple(sorted(new)), tag.atoms.permute(order),
               tuple(sorted(perm.index(d) for d in tag.folded)))


@register(aten.einsum)
class Einsum(Rule):
    """A two-operand einsum that is a batched matmul once its letters are ordered (MaxViT's
    ``"bghid,bghjd->bghij"`` and ``"bghij,bghjd->bghid"``): batch letters in both operands and
    the output, one letter of each operand's own, one contracted."""

    folds = True

    def visit(self, walk: Walk, node: Node) -> None:
        equation, operands = node.args[0], list(node.args[1])
        spec = equation.replace(" ", "")
        if len(operands) != 2 or "..." in spec or "->" not in spec:
            raise Unsupported("an einsum of other than two operands, or with '...'")
        ins, out = spec.split("->")
        la, lb = ins.split(",")
        batch = [c for c in out if c in la and c in lb]
        m, k, nn = ([c for c in la if c not in lb], [c for c in la if c in lb and c not in out],
                    [c for c in lb if c not in la])
        if (len(m) != 1 or len(k) != 1 or len(nn) != 1 or len(set(la)) != len(la)
                or len(set(lb)) != len(lb) or set(out) != set(batch + m + nn)):
            raise Unsupported(f"an einsum that is not a batched matmul ({equation})")
        pa = [la.index(c) for c in batch + m + k]
        pb = [lb.index(c) for c in batch + k + nn]
        a, b = operands
        dims, atoms, folded = contract(walk, _permute(walk.tag(a), pa), _permute(walk.tag(b), pb),
                                       [shape_of(a)[i] for i in pa], [shape_of(b)[i] for i in pb])
        layout = batch + m + nn  # the output of contract; the einsum's is ``out``
        tag = _permute(Tag(dims, atoms, folded), [layout.index(c) for c in out])
        walk.set(node, tag.dims, tag.atoms, Step(self, [], info={"shape": tag.atoms.shape}),
                 tag.folded)

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        return unknown(step.info["shape"])


def _per_head(walk: Walk, x: Node) -> Tag | None:
    """``x``'s tag with the heads along dim 1, even when there is one head (multi-query
    attention: a size-1 dim carries no channels)."""
    tag = walk.tag(x)
    if tag is not None and tag.dims == (3,) and shape_of(x)[1] == 1:
        return Tag((1, 3), tag.atoms.unsqueeze(0))
    return tag


_CREATE = (aten.zeros, aten.ones, aten.full, aten.empty)
_SAME = (aten.where, aten.masked_fill, aten.add, aten.sub, aten.mul, aten.div, aten.clone,
         aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to, aten.expand)


def uniform_along(node: Node, dim: int) -> list[tuple[Node, int, int, int]] | None:
    """If ``node`` is provably the same at every index of ``dim`` (built by ``zeros``/``full``…
    and broadcasting ops from tensors of size 1 there), the size arguments to edit so that it
    has size 1 there and broadcasts instead: ``(node, argument index, dim, new size)``; else
    None."""
    shape = shape_of(node)
    if shape[dim] == 1:
        return []
    if node.op != "call_function":
        return None
    op = packet(node)
    if op in _CREATE:
        return [(node, 0, dim, 1)] if isinstance(node.args[0], (list, tuple)) else None
    if op not in _SAME:
        return None
    edits = [(node, 1, dim, -1)] if op is aten.expand else []
    for arg in node.args[:1] if op is aten.expand else node.args:
        if not isinstance(arg, Node):
            continue
        inner = dim - (len(shape) - len(shape_of(arg)))
        if inner < 0:
            continue
        found = uniform_along(arg, inner)
        if found is None:
            return None
        edits += found
    return edits


@register(aten.matmul, aten.bmm, aten.mm)
class Matmuls(Matmul):
    """A weight op when the second operand is a parameter ``[in, out]`` (or a transposed
    ``[out, in]`` one: :class:`~.producers.LinearT`); otherwise a contraction of two
    activations (see the module doc)."""

    out_dim, in_dim, bias_at = 1, 0, -1
    creates = True
    folds = True

    def operands(self, node: Node) -> tuple[Any, Any, Any]:
        return node.args[0], node.args[1], None

    def visit(self, walk: Walk, node: Node) -> None:
        weight = walk.param_of(node.args[1])
        seen = node.args[1]  # x @ wᵀ: the weight read through a transpose
        transposed = weight is None and isinstance(seen, Node) and swaps_last_two(seen)
        if transposed:
            weight = walk.param_of(seen.args[0])
        if weight is not None and weight in walk.params and walk.params[weight].dim() == 2:
            if any(walk.tag(a) is not None and walk.tag(a).folded for a in node.args[:2]):
                raise Unsupported("multiplies channels folded into the batch by a weight")
            return LINEAR_T.visit(walk, node) if transposed else super().visit(walk, node)
        if not any(walk.tag(a) is not None for a in node.args[:2]):
            return
        self.contract(walk, node)

    def contract(self, walk: Walk, node: Node) -> None:
        a, b = node.args[:2]
        n = len(shape_of(node))
        if len(shape_of(a)) != n or len(shape_of(b)) != n or n < 3:
            raise Unsupported("multiplies activations of different ranks")
        dims, atoms, folded = contract(walk, walk.tag(a), walk.tag(b), shape_of(a), shape_of(b))
        walk.set(node, dims, atoms, Step(self, [], info={"shape": atoms.shape}), folded)

    def constant(self, node: Node, step: Step, consts: dict[Node, Const], graph: Graph) -> Const:
        if "weight" in step.info:
            return super().constant(node, step, consts, graph)
        return unknown(step.info["shape"])

    def reads(self, c: Consumer, weight: torch.Tensor) -> torch.Tensor:
        return any_nonzero(weight, 1)

    def delta(self, c: Consumer, weight: torch.Tensor, value: torch.Tensor,
              gone: torch.Tensor) -> torch.Tensor:
        return _where(gone, value) @ weight.detach().double()

