from __future__ import annotations

import pytest
import torch

import chop


def test_fold_equals_masked_output_and_removes_mask_nodes(cnn, cnn_graph, cnn_batches):
    chop.run(cnn_graph, "snip, mask{sparsity=0.9}", data=cnn_batches)
    cnn_graph.eval()
    x = cnn_batches[2][0]
    masked = cnn_graph(x)
    original = {k: v.clone() for k, v in cnn.state_dict().items()}
    chop.run(cnn_graph, "fold")
    torch.testing.assert_close(cnn_graph(x), masked, rtol=0, atol=0)
    nodes = list(cnn_graph.module.graph.nodes)
    assert not any(n.target is torch.ops.aten.mul.Tensor for n in nodes)
    assert not any(k.endswith("_mask") for k in cnn_graph.module.state_dict())
    for node in cnn_graph.weight_nodes():
        mask = node.meta["chop"].get("mask")
        if mask is not None:
            assert not cnn_graph.parameter(node)[~mask].any()
    for key, value in cnn.state_dict().items():  # the traced model is left alone
        assert torch.equal(value, original[key]), key


def test_fold_on_a_graph_masked_by_an_earlier_run(cnn_graph, cnn_batches):
    chop.run(cnn_graph, "magnitude, mask{sparsity=0.5}")
    chop.run(cnn_graph, "fold")  # 'mask' is carried by the graph, so fold may run alone
    assert cnn_graph.history[-1].name == "fold" and cnn_graph.history[-1].modified
    chop.run(cnn_graph, "fold")  # nothing left to fold
    assert not cnn_graph.history[-1].modified


def test_fold_without_masks_is_an_error(cnn_graph):
    with pytest.raises(chop.MissingMetadataError, match="pass 'fold' needs 'mask'.*Run one of mask"):
        chop.run(cnn_graph, "fold")

