from __future__ import annotations

import torch

import chop


def test_magnitude_is_abs_of_the_effective_weight(cnn, cnn_graph, cnn_batches):
    chop.run(cnn_graph, "magnitude")
    for node in cnn_graph.weight_nodes():
        assert torch.equal(node.meta["chop"]["saliency"], cnn.get_parameter(node.target).abs())
    chop.run(cnn_graph, "mask{sparsity=0.5}, magnitude")  # masked weights now score 0
    node = cnn_graph.weight_node("fc.weight")
    mask = node.meta["chop"]["mask"]
    expected = torch.where(mask, cnn.fc.weight.detach().abs(), 0.0)
    assert torch.equal(node.meta["chop"]["saliency"], expected)
