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


def test_module_scores_write_the_given_up_previous_scores_in_place(cnn):
    from chop.passes.analysis.magnitude import Magnitude

    params = [p for p in cnn.parameters() if p.dim() > 1]
    previous = [torch.full_like(p, 7.0) for p in params]
    scores = Magnitude().score_module(cnn, params, previous=previous)
    assert [s.data_ptr() for s in scores] == [old.data_ptr() for old in previous]
    for got, p in zip(scores, params):
        assert torch.equal(got, p.detach().abs())
    fresh = Magnitude().score_module(cnn, params, previous=[None] * len(params))
    assert all(f.data_ptr() != old.data_ptr() for f, old in zip(fresh, previous))
    assert all(torch.equal(f, s) for f, s in zip(fresh, scores))
