"""snip2: |g·w − ½·H_ww·w²| with the Hessian diagonal from a full Hessian of the eager model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import chop
from chop.passes.analysis.snip2 import Snip2

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_snip2(model, batches):
    """g and diag(H) of the summed loss by torch.autograd.functional.hessian (float64)."""
    model = copy.deepcopy(model).eval().double()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def loss(vector):
        pieces = dict(zip(names, (v.view(p.shape) for v, p in zip(vector.split(sizes), params))))
        return sum(nn.functional.cross_entropy(functional_call(model, pieces, (x.double(),)), y)
                   for x, y in batches)

    with sdpa_kernel([SDPBackend.MATH]):  # attention differentiated twice
        diagonal = torch.autograd.functional.hessian(loss, flat).diagonal()
        vector = flat.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(vector), vector)
    score = (g * flat - 0.5 * diagonal * flat.square()).abs().detach()

    def split(t):
        return {n: s.view(p.shape) for n, s, p in zip(names, t.split(sizes), params)}

    return split(score), split(diagonal)


def test_exact_hessian_diagonal(tiny, tiny_batches, saliency_of):
    graph = chop.trace(tiny, (tiny_batches[0][0],))
    chop.run(graph, "snip2{batches=2, chunk=7}", data=tiny_batches)
    expected, diagonal = reference_snip2(tiny, tiny_batches)
    assert any(d.abs().max() > 1e-3 for d in diagonal.values())  # the second-order term matters
    got = saliency_of(graph)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_exact_diagonal_on_a_cnn_matches_single_hessian_vector_products(bn_cnn, cnn_batches):
    from chop.passes.analysis.snip2 import hessian_diagonal_exact

    model = copy.deepcopy(bn_cnn).eval()
    x, y = cnn_batches[0]
    w = model.conv2.weight
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), w, create_graph=True)
    diagonal = hessian_diagonal_exact(g, w, chunk=100).reshape(-1)
    for i in (0, 17, 300, 575):
        e = torch.zeros(w.numel())
        e[i] = 1
        (row,) = torch.autograd.grad(g, w, e.view(w.shape), retain_graph=True)
        torch.testing.assert_close(diagonal[i], row.reshape(-1)[i], rtol=1e-5, atol=1e-9)


def test_hutchinson_estimates_the_diagonal(tiny, tiny_batches, saliency_of):
    graph = chop.trace(tiny, (tiny_batches[0][0],))
    chop.run(graph, "snip2{hessian=hutchinson, samples=4000, chunk=1000}", data=tiny_batches)
    expected, _ = reference_snip2(tiny, tiny_batches[:1])
    got = torch.cat([v.reshape(-1) for v in saliency_of(graph).values()]).double()
    want = torch.cat([v.reshape(-1) for v in expected.values()])
    assert (got - want).norm() / want.norm() < 0.05
    again = chop.trace(tiny, (tiny_batches[0][0],))
    chop.run(again, "snip2{hessian=hutchinson, samples=4000, chunk=1000}", data=tiny_batches)
    pairs = zip(saliency_of(graph).values(), saliency_of(again).values())
    assert all(torch.equal(a, b) for a, b in pairs)
    chop.run(again, "snip2{hessian=hutchinson, samples=50, seed=1}", data=tiny_batches)
    pairs = zip(saliency_of(graph).values(), saliency_of(again).values())
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_snip2_leaves_the_model_bit_identical_and_mask_works(bn_cnn, cnn_batches, unchanged):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    with unchanged(bn_cnn):
        chop.run(graph, "snip2{bn=train, params=prunable, hessian=hutchinson, samples=8}",
                 data=cnn_batches)
    chop.run(graph, "mask{sparsity=0.9}")
    assert graph.history[-1].info["kept"]["fc.weight"][0] > 0


def test_exact_refuses_large_models_and_says_what_to_do(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    with pytest.raises(chop.OptionError, match=r"above max_weights=1000; use hessian=hutchinson"):
        chop.run(graph, "snip2{max_weights=1000}", data=mlp_batches)


def test_options():
    for key in ("batches", "samples", "chunk", "max_weights"):
        with pytest.raises(chop.OptionError, match=f"snip2: {key}=0 must be at least 1"):
            Snip2(**{key: 0})
    with pytest.raises(chop.OptionError, match="hessian='diag'"):
        Snip2(hessian="diag")


def test_hutchinson_diagonal_converges_to_the_exact_one(tiny, tiny_batches):
    from chop.passes.analysis.snip2 import hessian_diagonal_hutchinson

    _, exact = reference_snip2(tiny, tiny_batches[:1])
    model = copy.deepcopy(tiny).double()
    x, y = tiny_batches[0]
    weights = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x.double()), y), weights,
                                create_graph=True)
    generator = torch.Generator().manual_seed(0)
    estimate = hessian_diagonal_hutchinson(list(grads), weights, 20000, generator, chunk=5000)
    got = torch.cat([e.reshape(-1) for e in estimate])
    want = torch.cat([d.reshape(-1) for d in exact.values()])
    assert (got - want).norm() / want.norm() < 0.1


@pytest.mark.parametrize("hessian", ["exact", "hutchinson"])
def test_snip2_through_attention_equals_the_full_hessian(
    attention, attention_batches, hessian, saliency_of
):
    graph = chop.trace(attention, (attention_batches[0][0],))
    options = "hessian=hutchinson, samples=4000, chunk=1000" if hessian == "hutchinson" else ""
    chop.run(graph, f"snip2{{{options}}}", data=attention_batches)
    expected, diagonal = reference_snip2(attention, attention_batches)
    assert any(d.abs().max() > 1e-3 for d in diagonal.values())  # attention is not linear
    got = saliency_of(graph)
    assert got.keys() == expected.keys()
    if hessian == "exact":
        for name in got:
            torch.testing.assert_close(got[name].double(), expected[name], rtol=1e-4, atol=1e-6,
                                       msg=name)
    else:
        got_flat = torch.cat([got[n].reshape(-1) for n in expected]).double()
        want = torch.cat([v.reshape(-1) for v in expected.values()])
        assert (got_flat - want).norm() / want.norm() < 0.015  # 0.008 here; SNIP alone: 0.087
