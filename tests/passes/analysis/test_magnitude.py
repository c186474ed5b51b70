from __future__ import annotations

import torch

import chop


def test_magnitude_is_abs_of_the_effective_weight(cnn, cnn_graph, cnn_batches):
    before = {name: p.detach().clone() for name, p in cnn.named_parameters()}
    chop.run(cnn_graph, "magnitude")
    for node in cnn_graph.weight_nodes():
        assert torch.equal(node.meta["chop"]["saliency"], before[node.target].abs())
    chop.run(cnn_graph, "mask{sparsity=0.5}, magnitude")  # masked weights now score 0
    node = cnn_graph.weight_node("fc.weight")
    mask = node.meta["chop"]["mask"]
    expected = torch.where(mask, before["fc.weight"].abs(), 0.0)
    assert torch.equal(node.meta["chop"]["saliency"], expected)
    # the scores are new tensors: the weights, masked or not, are as they were
    assert all(torch.equal(p, before[name]) for name, p in cnn.named_parameters())
