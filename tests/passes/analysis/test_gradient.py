"""gradient: saliency equals an independent |∂L/∂w| on the eager model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import chop
from chop.passes.analysis.gradient import Gradient

pytestmark = pytest.mark.usefixtures("one_thread")


def eager_gradients(model, batches):
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    per_batch = []
    for x, y in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
        per_batch.append(dict(zip(params, grads)))
    return per_batch


@pytest.mark.parametrize("accumulate", ["abs-of-sum", "sum-of-abs"])
def test_gradient_equals_eager_gradients(bn_cnn, cnn_batches, accumulate, saliency_of):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    chop.run(graph, Gradient(batches=2, accumulate=accumulate), data=cnn_batches)
    grads = eager_gradients(bn_cnn, cnn_batches[:2])
    got = saliency_of(graph)
    assert got.keys() == grads[0].keys()
    for name in got:
        if accumulate == "abs-of-sum":
            expected = (grads[0][name] + grads[1][name]).abs()
        else:
            expected = grads[0][name].abs() + grads[1][name].abs()
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_leaves_the_model_bit_identical_and_mask_works(bn_cnn, cnn_batches, unchanged):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    with unchanged(bn_cnn):
        chop.run(graph, "gradient{bn=train, batches=2}", data=cnn_batches)
    chop.run(graph, "mask{sparsity=0.75}", data=cnn_batches)
    kept = graph.history[-1].info["kept"]
    assert sum(k for k, _ in kept.values()) == round(0.25 * sum(n for _, n in kept.values()))


def test_gradient_options():
    with pytest.raises(chop.OptionError, match="gradient: batches=0 must be at least 1"):
        Gradient(batches=0)
    with pytest.raises(chop.OptionError, match="accumulate='max'"):
        Gradient(accumulate="max")
