from __future__ import annotations

import torch

import chop


def scores(graph):
    return {n.target: n.meta["chop"]["saliency"].clone() for n in graph.weight_nodes()}


def test_random_is_reproducible_per_seed_and_uniform(cnn_graph):
    chop.run(cnn_graph, "random{seed=3}")
    first = scores(cnn_graph)
    chop.run(cnn_graph, "random{seed=3}")
    assert all(torch.equal(first[k], v) for k, v in scores(cnn_graph).items())
    chop.run(cnn_graph, "random{seed=4}")
    assert not torch.equal(first["fc.weight"], scores(cnn_graph)["fc.weight"])
    values = torch.cat([v.flatten() for v in first.values()])
    assert 0.0 <= values.min() and values.max() < 1.0
    assert abs(values.mean().item() - 0.5) < 0.05


def test_random_scores_zero_where_already_masked(cnn_graph):
    chop.run(cnn_graph, "random, mask{sparsity=0.7}, random{seed=9}")
    node = cnn_graph.weight_node("conv2.weight")
    mask, score = node.meta["chop"]["mask"], node.meta["chop"]["saliency"]
    assert torch.equal(score == 0, ~mask)
