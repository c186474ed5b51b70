"""grasp: saliency θ ⊙ Hg (the negated GraSP score) against a full Hessian of the eager model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import chop
from chop.passes.analysis.grasp import Grasp

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_grasp_score(model, batches, temperature):
    """GraSP's own score S(−θ) = −θ ⊙ Hg, H from torch.autograd.functional.hessian."""
    model = copy.deepcopy(model).eval()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params]).double()

    def loss(vector):
        pieces = dict(zip(names, (v.view(p.shape) for v, p in zip(vector.split(sizes), params))))
        outputs = [functional_call(model.double(), pieces, (x.double(),)) for x, _ in batches]
        return sum(nn.functional.cross_entropy(out / temperature, y)
                   for out, (_, y) in zip(outputs, batches))

    with sdpa_kernel([SDPBackend.MATH]):  # attention differentiated twice
        hessian = torch.autograd.functional.hessian(loss, flat)
        (g,) = torch.autograd.grad(loss(flat.requires_grad_()), flat)
    score = -flat.detach() * (hessian @ g)
    return {n: s.view(p.shape) for n, s, p in zip(names, score.split(sizes), params)}


@pytest.mark.parametrize("which, temperature", [("tiny", 1.0), ("tiny", 200.0), ("attention", 1.0)])
def test_grasp_is_minus_the_papers_score(request, which, temperature, saliency_of):
    """Also through attention, whose fused kernels have no double backward."""
    model, batches = request.getfixturevalue(which), request.getfixturevalue(f"{which}_batches")
    graph = chop.trace(model, (batches[0][0],))
    chop.run(graph, Grasp(batches=len(batches), temperature=temperature), data=batches)
    expected = reference_grasp_score(model, batches, temperature)
    got = saliency_of(graph)
    assert got.keys() == expected.keys()
    for name in got:
        scale = expected[name].abs().max()
        torch.testing.assert_close(got[name].double(), -expected[name], rtol=1e-4,
                                   atol=1e-5 * scale, msg=name)


def test_mask_removes_the_weights_with_the_highest_grasp_score(tiny, tiny_batches):
    graph = chop.trace(tiny, (tiny_batches[0][0],))
    chop.run(graph, "grasp{batches=2, temperature=1}, mask{sparsity=0.4}", data=tiny_batches)
    score = reference_grasp_score(tiny, tiny_batches, 1.0)
    names = ["fc1.weight", "fc2.weight"]
    flat = torch.cat([score[n].reshape(-1) for n in names])
    removed = torch.zeros_like(flat, dtype=torch.bool)
    removed[flat.argsort(descending=True)[: round(0.4 * flat.numel())]] = True
    masks = torch.cat([graph.weight_node(n).meta["chop"]["mask"].reshape(-1) for n in names])
    assert torch.equal(~masks, removed)
    assert (flat < 0).any() and (flat > 0).any()  # the saliency really has both signs


def grasp_by_hessian_vector_product(model, batches, temperature):
    """θ ⊙ Hg with BatchNorm on batch statistics and dropout off, from
    torch.autograd.functional.hvp of the summed loss (float64): no full Hessian."""
    model = copy.deepcopy(model).double().train()
    model.drop.p = 0.0
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def loss(*values):
        pieces = dict(zip(names, values))
        return sum(nn.functional.cross_entropy(functional_call(model, pieces, (x.double(),))
                                               / temperature, y) for x, y in batches)

    _, g = torch.autograd.functional.vjp(loss, params)  # g = ∂L/∂θ
    _, hg = torch.autograd.functional.hvp(loss, params, g)
    return {n: p * h for n, p, h in zip(names, params, hg)}


def test_grasp_with_batch_statistics_leaves_the_model_bit_identical(
    bn_cnn, cnn_batches, unchanged, saliency_of
):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    with unchanged(bn_cnn):
        chop.run(graph, "grasp{bn=train, batches=2}", data=cnn_batches)
    expected = grasp_by_hessian_vector_product(bn_cnn, cnn_batches[:2], 200.0)
    got = saliency_of(graph)
    assert got.keys() == expected.keys()
    scale = max(e.abs().max() for e in expected.values())  # conv biases before BN: g = 0
    for name in got:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-3,
                                   atol=1e-5 * scale, msg=name)
    chop.run(graph, "mask{sparsity=0.9}")  # keeps the highest θ ⊙ Hg over linear and conv weights
    names = ["conv1.weight", "conv2.weight", "fc.weight"]
    flat = torch.cat([got[n].reshape(-1) for n in names])
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[flat.argsort(descending=True)[: round(0.1 * flat.numel())]] = True
    masks = torch.cat([graph.weight_node(n).meta["chop"]["mask"].reshape(-1) for n in names])
    assert torch.equal(masks, kept)


def test_grasp_options_and_errors(tiny, tiny_batches):
    with pytest.raises(chop.OptionError, match="temperature=0.0 must be positive"):
        Grasp(temperature=0)
    with pytest.raises(chop.OptionError, match="batches=0"):
        Grasp(batches=0)
    graph = chop.trace(tiny, (tiny_batches[0][0],))
    with pytest.raises(chop.DataError, match="grasp needs data"):
        chop.run(graph, "grasp")
