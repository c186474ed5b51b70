"""snip: saliency equals an independent |∂L/∂w ⊙ w| on the eager model; scoring changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import chop
from chop.passes.analysis.snip import Snip, snip_saliency


def eager_snip(model, batches, loss_fn=nn.functional.cross_entropy, accumulate="abs-of-sum"):
    """Reference: SNIP on a copy of the eager model in eval mode, via autograd on m at m = 1."""
    model = copy.deepcopy(model).eval()
    names = [name for name, _ in model.named_parameters()]
    masks = {name: torch.ones_like(p, requires_grad=True) for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in batches:
        masked = {name: params[name].detach() * masks[name] for name in names}
        out = torch.func.functional_call(model, masked, (x,))
        grads = torch.autograd.grad(loss_fn(out, y), [masks[n] for n in names])
        for name, g in zip(names, grads):
            total[name] += g if accumulate == "abs-of-sum" else g.abs()
    return {name: t.abs() for name, t in total.items()}


def saliency(graph):
    return {n.target: n.meta["chop"]["saliency"] for n in graph.weight_nodes()}


@pytest.mark.parametrize("accumulate", ["abs-of-sum", "sum-of-abs"])
def test_snip_equals_connection_sensitivity_of_the_eager_model(cnn, cnn_batches, cnn_graph, accumulate):
    chop.run(cnn_graph, Snip(batches=3, accumulate=accumulate), data=cnn_batches)
    expected = eager_snip(cnn, cnn_batches, accumulate=accumulate)
    got = saliency(cnn_graph)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_abs_of_sum_differs_from_sum_of_abs(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    a = snip_saliency(graph, mlp_batches, batches=3, accumulate="abs-of-sum")
    b = snip_saliency(graph, mlp_batches, batches=3, accumulate="sum-of-abs")
    assert all((a[k] <= b[k] + 1e-6).all() for k in a)  # |Σ x| ≤ Σ |x|
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_custom_loss_is_used(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))

    def loss(outputs, targets):
        return (outputs ** 2).mean()

    chop.run(graph, "snip", data=mlp_batches, loss=loss)
    expected = eager_snip(mlp, mlp_batches[:1], loss_fn=loss)
    for name, value in saliency(graph).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_scoring_leaves_parameters_buffers_and_flags_bit_identical(cnn, cnn_batches, bn):
    cnn.conv1.bias.requires_grad_(False)
    cnn.conv1.weight.requires_grad_(False)  # a frozen weight is still scored
    graph = chop.trace(cnn, (cnn_batches[0][0],))
    cnn.fc.weight.grad = torch.full_like(cnn.fc.weight, 7.0)
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    flags = {k: p.requires_grad for k, p in cnn.named_parameters()}
    graph_flags = {k: p.requires_grad for k, p in graph.module.named_parameters()}
    assert not graph_flags["conv1.weight"]
    chop.run(graph, f"snip{{batches=2, bn={bn}}}", data=cnn_batches)
    assert saliency(graph)["conv1.weight"].abs().sum() > 0
    for key, value in cnn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {k: p.requires_grad for k, p in cnn.named_parameters()} == flags
    assert {k: p.requires_grad for k, p in graph.module.named_parameters()} == graph_flags
    assert torch.equal(cnn.fc.weight.grad, torch.full_like(cnn.fc.weight, 7.0))
    assert graph.training  # the graph's mode is restored too


def test_bn_train_scores_with_batch_statistics(cnn, cnn_batches, cnn_graph):
    chop.run(cnn_graph, "snip{bn=train}", data=cnn_batches)
    reference = copy.deepcopy(cnn).train()
    reference.drop.p = 0.0
    x, y = cnn_batches[0]
    loss = nn.functional.cross_entropy(reference(x), y)
    grad = torch.autograd.grad(loss, reference.conv1.weight)[0]
    torch.testing.assert_close(
        saliency(cnn_graph)["conv1.weight"], (grad * reference.conv1.weight).abs().detach(),
        rtol=1e-4, atol=1e-7,
    )


def test_snip_without_data_says_how_to_pass_it(cnn_graph):
    with pytest.raises(chop.DataError, match=r"snip needs data: pass data=\.\.\. to chop.run"):
        chop.run(cnn_graph, "snip")


def test_snip_with_too_few_batches_is_an_error(cnn_graph, cnn_batches):
    with pytest.raises(chop.DataError, match="snip asked for 5 batches but data gave 3"):
        chop.run(cnn_graph, "snip{batches=5}", data=cnn_batches)


def test_snip_rejects_batches_that_are_not_pairs(cnn_graph, cnn_batches):
    with pytest.raises(chop.DataError, match="batch 0 is a Tensor, not an"):
        chop.run(cnn_graph, "snip", data=[cnn_batches[0][0]])


def test_snip_rejects_a_non_scalar_loss(cnn_graph, cnn_batches):
    with pytest.raises(chop.DataError, match="the loss must return a scalar tensor"):
        chop.run(cnn_graph, "snip", data=cnn_batches, loss=lambda out, y: out)


def test_batches_out_of_range():
    with pytest.raises(chop.OptionError, match="snip: batches=0 must be at least 1"):
        Snip(batches=0)


class SharedGradients(nn.Module):
    """Autograd hands `a` and `b` one gradient tensor ((a + b) * x), and `scale` (only summed)
    a stride-0 expanded one: accumulation must not write through either in place."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(4))
        self.w = nn.Parameter(torch.randn(4, 3))
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return ((self.a + self.b) * x) @ self.w + self.scale.sum()


@pytest.mark.parametrize("accumulate", ["abs-of-sum", "sum-of-abs"])
@pytest.mark.parametrize("criterion", ["snip", "gradient"])
def test_shared_and_expanded_gradients(accumulate, criterion):
    torch.manual_seed(0)
    model = SharedGradients()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    graph = chop.trace(model, (batches[0][0],))
    chop.run(graph, f"{criterion}{{batches=2, accumulate={accumulate}}}", data=batches)
    params = dict(model.named_parameters())
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in batches:
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
        for (name, p), g in zip(params.items(), grads):
            term = g * p if criterion == "snip" else g
            totals[name] += term if accumulate == "abs-of-sum" else term.abs()
    for name, value in saliency(graph).items():
        torch.testing.assert_close(value, totals[name].abs().detach(), rtol=1e-5, atol=1e-7, msg=name)


def test_saliency_keeps_the_weight_layout(mlp, mlp_batches):
    transposed = mlp.layers[1].weight  # a weight stored transposed: its grad comes back that way
    with torch.no_grad():
        mlp.layers[1].weight = nn.Parameter(transposed.detach().t().contiguous().t())
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip{batches=2}", data=mlp_batches)
    for node in graph.weight_nodes():
        assert node.meta["chop"]["saliency"].stride() == graph.parameter(node).stride(), node.target
