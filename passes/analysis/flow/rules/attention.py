"""Scaled dot-product attention over per-head views ``[batch, heads, seq, head_dim]``: a head's q,
k and v rows go together (one unit per head), and the output carries v's layout. A head whose
values are constant outputs that constant (softmax weights sum to 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from chop.ir.graph import node_arg
from chop.passes.analysis.flow.rule import Rule, Step, Unsupported, aten, register

if TYPE_CHECKING:
    from chop.passes.analysis.flow.walk import Walk


@register(aten.scaled_dot_product_attention)
class Attention(Rule):
    def visit(self, walk: Walk, node: Node) -> None:
        q, k, v = node.args[:3]
        if node_arg(node, 7, "enable_gqa", False):
            raise Unsupported("grouped-query attention")
        tags = [walk.tag(t) for t in (q, k, v)]
        if any(t is None or t.dims != (1, 3) for t in tags) or not (
                tags[0].atoms.shape == tags[1].atoms.shape == tags[2].atoms.shape):
            raise Unsupported("attention whose q, k and v do not all carry heads along dim 1 and "
                              "head features along dim 3 with the same layout")
        if walk.tag(node_arg(node, 3, "attn_mask")) is not None:
            raise Unsupported("its attention mask carries channels")
        for h in range(tags[0].atoms.shape[0]):
            head = torch.cat([t.atoms[h].flatten() for t in tags])
            walk.join(head[:1].expand_as(head), head)
            walk.heads.update(head.tolist())
        walk.set(node, (1, 3), tags[2].atoms, Step(self, [v]))
