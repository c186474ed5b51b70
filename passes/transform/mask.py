"""``mask``: keep the most salient weights, by inserting ``mul(weight, mask)`` nodes.

Each selected weight node gets a bool mask buffer (``<param>_mask`` on the same submodule, so it
is in ``state_dict`` and survives save/load) and a ``mul`` node right after it that the weight's
users read instead. Masked entries then get zero gradient and contribute zero, so training needs
no re-masking after optimizer steps. Exactly round((1 − sparsity)·N) weights are kept, N counted
per layer (``scope=local``) or over all selected weights (``scope=global``); ties are broken
deterministically by position (see :mod:`chop.select`). Running ``mask`` again updates the masks.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import Node

from chop import meta
from chop.errors import MissingMetadataError, OptionError
from chop.graph import Graph
from chop.pass_base import Context, Pass, PassResult, option
from chop.select import keep_masks

log = logging.getLogger("chop")
MASK_OF = "mask_of"  # meta["chop"] entry on an inserted mul node: the masked parameter's name


def kept_count(numel: int, sparsity: float) -> int:
    """round((1 − sparsity)·numel), halves rounded up."""
    return min(numel, math.floor((1.0 - sparsity) * numel + 0.5))


def select_weights(
    graph: Graph,
    include: str | None = None,
    exclude: str | None = None,
    *,
    biases: bool = False,
    norms: bool = False,
    embeddings: bool = False,
) -> list[Node]:
    """Weight nodes to prune: linear and conv weights (plus the roles asked for), filtered by
    ``include``/``exclude`` regexes searched in the parameter name."""
    roles = {"linear", "conv"} | {r for r, on in
                                  (("bias", biases), ("norm", norms), ("embedding", embeddings)) if on}
    return [
        n for n in graph.weight_nodes()
        if meta.entries(n).get("role") in roles
        and (include is None or re.search(include, n.target))
        and (exclude is None or not re.search(exclude, n.target))
    ]


def insert_mask(graph: Graph, node: Node, mask: torch.Tensor) -> None:
    """Mask weight ``node`` with ``mask`` (bool, True = kept): add or update its mask buffer and
    its ``mul`` node. Records the mask in ``node.meta["chop"]["mask"]``."""
    name = node.target
    mask = mask.to(torch.bool)
    meta.entries(node)["mask"] = mask
    for user in node.users:
        if user.meta.get("chop", {}).get(MASK_OF) == name:  # already masked: update the buffer
            graph.module.get_buffer(user.args[1].target).copy_(mask)
            return
    owner_name, _, attr = name.rpartition(".")
    owner = graph.module.get_submodule(owner_name)
    buffer = f"{attr}_mask"
    while hasattr(owner, buffer):  # e.g. a model pruned with torch.nn.utils.prune before
        buffer += "_"
    owner.register_buffer(buffer, mask.clone())
    target = f"{owner_name}.{buffer}" if owner_name else buffer
    graph_ = graph.module.graph
    with graph_.inserting_after(node):
        mask_node = graph_.get_attr(target)
    with graph_.inserting_after(mask_node):
        mul = graph_.call_function(torch.ops.aten.mul.Tensor, (node, mask_node))
    node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    meta.entries(mul)[MASK_OF] = name
    if "val" in node.meta:
        mul.meta["val"] = node.meta["val"]


def mask_weights(
    graph: Graph, nodes: list[Node], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Mask ``nodes`` keeping the highest-saliency weights; returns the masks by name."""
    scores = []
    for node in nodes:
        score = meta.entries(node).get("saliency")
        if score is None:
            raise MissingMetadataError(
                f"weight {node.target} has no saliency; run a criterion (snip, magnitude, "
                "random) that scores it before mask"
            )
        scores.append(score)
    if scope == "global":
        masks = keep_masks(scores, kept_count(sum(s.numel() for s in scores), sparsity))
    else:
        masks = [keep_masks([s], kept_count(s.numel(), sparsity))[0] for s in scores]
    for node, mask in zip(nodes, masks):
        insert_mask(graph, node, mask)
    graph.recompile()
    empty = [n.target for n, m in zip(nodes, masks) if m.numel() and not m.any()]
    if empty:
        log.warning(
            "mask emptied %d layer(s): %s; the network may be disconnected (lower the sparsity "
            "or use scope=local)", len(empty), ", ".join(empty),
        )
    return {n.target: m for n, m in zip(nodes, masks)}


@dataclass(frozen=True)
class Mask(Pass):
    """Keep the top (1 − sparsity) weights by saliency; insert mul(weight, mask) nodes."""

    name: ClassVar[str] = "mask"
    kind: ClassVar[Literal["transform"]] = "transform"
    requires: ClassVar[tuple[str, ...]] = ("saliency",)
    provides: ClassVar[tuple[str, ...]] = ("mask",)

    sparsity: float = option(0.9, "fraction of the selected weights to prune, in [0, 1)")
    scope: Literal["global", "local"] = option(
        "global", "rank weights over all selected layers together, or per layer"
    )
    include: str | None = option(None, "regex: only prune parameters whose name matches")
    exclude: str | None = option(None, "regex: never prune parameters whose name matches")
    biases: bool = option(False, "also prune biases")
    norms: bool = option(False, "also prune normalisation weights (batch/layer/group norm)")
    embeddings: bool = option(False, "also prune embedding tables (incl. tied output heads)")

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(
                f"mask: sparsity={self.sparsity} is out of range; it must be in [0, 1) "
                "(0.9 prunes 90% and keeps 10%)"
            )
        for key in ("include", "exclude"):
            pattern = getattr(self, key)
            try:
                re.compile(pattern or "")
            except re.error as e:
                raise OptionError(f"mask: {key}={pattern!r} is not a valid regex: {e}") from None

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        nodes = select_weights(
            graph, self.include, self.exclude,
            biases=self.biases, norms=self.norms, embeddings=self.embeddings,
        )
        if not nodes:
            raise OptionError(
                f"mask selected no weights of {graph.name} (include={self.include!r}, "
                f"exclude={self.exclude!r}); prunable parameters are: "
                + ", ".join(n.target for n in graph.weight_nodes()
                            if meta.entries(n).get("role") in ("linear", "conv"))
            )
        masks = mask_weights(graph, nodes, self.sparsity, self.scope)
        kept = {name: (int(m.sum()), m.numel()) for name, m in masks.items()}
        return PassResult(modified=True, info={"kept": kept})
