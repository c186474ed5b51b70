"""``fold``: bake the masks into the weights and erase the mask nodes.

Each masked parameter is replaced by a new parameter holding ``weight * mask`` (the traced
model's own tensor is left alone), the ``mul`` node's users read the weight node again, and the
mask node and buffer are removed. The mask stays recorded in ``node.meta["chop"]["mask"]`` for
reports. The folded graph computes exactly what the masked graph did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from chop.ir.graph import Graph
from chop.ir.masks import mask_nodes, mask_of, masked
from chop.pipeline.pass_base import Context, Pass, PassResult


def fold_masks(graph: Graph, *, recompile: bool = True) -> list[str]:
    """Fold every mask node of ``graph``; returns the names of the folded parameters. Without
    ``recompile`` the module's code still reads the mask nodes: for a caller that edits the
    graph further and recompiles once (before anything runs it, even on an error)."""
    folded = []
    for mul in list(mask_nodes(graph)):
        name = mask_of(mul)
        weight_node, mask_node = mul.args
        owner, attr = graph.owner(mask_node.target)
        with torch.no_grad():
            weight = graph.parameter(name)
            mask = owner.get_buffer(attr)
            graph.replace_parameter(name, masked(weight.detach(), mask))
        mul.replace_all_uses_with(weight_node)
        graph.module.graph.erase_node(mul)
        if not mask_node.users:
            graph.module.graph.erase_node(mask_node)
            delattr(owner, attr)
        folded.append(name)
    if recompile:
        graph.recompile()
    return folded


@dataclass(frozen=True)
class Fold(Pass):
    """Bake masks into weights (weight * mask) and remove the mask nodes."""

    name: ClassVar[str] = "fold"
    kind: ClassVar[Literal["export"]] = "export"
    requires: ClassVar[tuple[str, ...]] = ("mask",)

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        folded = fold_masks(graph)
        return PassResult(modified=bool(folded), info={"folded": len(folded)})
