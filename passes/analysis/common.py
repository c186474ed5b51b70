"""Helpers the criterion passes share."""

from __future__ import annotations

import torch
from torch.fx import Node

from chop import meta
from chop.graph import Graph


def scored_nodes(graph: Graph) -> list[Node]:
    """The weight nodes a criterion scores: every floating-point parameter.

    Criteria score every parameter, so the ``mask`` pass can select any of them (biases, norms,
    embeddings on request) without re-running the criterion.
    """
    return [n for n in graph.weight_nodes() if graph.parameter(n).is_floating_point()]


def effective_weight(graph: Graph, node: Node) -> torch.Tensor:
    """The weight as the graph computes with it: masked entries are zero."""
    weight = graph.parameter(node).detach()
    mask = meta.entries(node).get("mask")
    return weight * mask if mask is not None else weight


def write_saliency(nodes: list[Node], scores: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store ``scores`` as the ``saliency`` of ``nodes``; returns them by parameter name."""
    for node, score in zip(nodes, scores):
        meta.entries(node)["saliency"] = score
    return {node.target: score for node, score in zip(nodes, scores)}
