"""snip's `params` and `normalize` options."""

from __future__ import annotations

import pytest
import torch

import chop
from chop.passes.analysis.snip import Snip

pytestmark = pytest.mark.usefixtures("one_thread")


def test_params_prunable_scores_only_linear_and_conv_weights(cnn, cnn_batches, saliency_of):
    full = chop.trace(cnn, (cnn_batches[0][0],))
    chop.run(full, "snip", data=cnn_batches)
    graph = chop.trace(cnn, (cnn_batches[0][0],))
    chop.run(graph, "magnitude, snip{params=prunable}", data=cnn_batches)
    got = saliency_of(graph)
    # the biases lost the saliency magnitude gave them: no stale scores of another criterion
    assert set(got) == {"conv1.weight", "conv2.weight", "fc.weight"}
    for name, value in got.items():
        assert torch.equal(value, saliency_of(full)[name])


def test_mask_after_prunable_scoring_works_and_refuses_unscored_biases(cnn, cnn_batches):
    graph = chop.trace(cnn, (cnn_batches[0][0],))
    chop.run(graph, "snip{params=prunable}, mask{sparsity=0.5}", data=cnn_batches)
    assert graph.history[-1].info["kept"]["fc.weight"][1] == cnn.fc.weight.numel()
    with pytest.raises(chop.ChopError, match=r"conv1\.bias has no saliency"):
        chop.run(graph, "snip{params=prunable}, mask{biases=true}", data=cnn_batches)


def test_normalize_divides_by_the_sum_and_keeps_the_ranking(cnn, cnn_batches, saliency_of):
    plain = chop.trace(cnn, (cnn_batches[0][0],))
    chop.run(plain, "snip{batches=2}, mask{sparsity=0.8}", data=cnn_batches)
    graph = chop.trace(cnn, (cnn_batches[0][0],))
    chop.run(graph, "snip{batches=2, normalize=true}, mask{sparsity=0.8}", data=cnn_batches)
    raw, scaled = saliency_of(plain), saliency_of(graph)
    total = sum(float(v.double().sum()) for v in raw.values())
    assert graph.history[0].info["normalizer"] == pytest.approx(total, rel=1e-12)
    assert sum(float(v.double().sum()) for v in scaled.values()) == pytest.approx(1.0, rel=1e-6)
    for name in raw:
        torch.testing.assert_close(scaled[name], raw[name] / total)
        assert torch.equal(
            plain.weight_node(name).meta["chop"].get("mask", torch.tensor(0)),
            graph.weight_node(name).meta["chop"].get("mask", torch.tensor(0)),
        )


def test_new_options_are_typed():
    with pytest.raises(chop.OptionError, match="params='some'"):
        Snip(params="some")
    with pytest.raises(chop.OptionError, match="normalize=1"):
        Snip(normalize=1)
