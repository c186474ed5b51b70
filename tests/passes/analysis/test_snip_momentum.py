"""snip-momentum: alpha·previous + beta·|w ⊙ g|, from data or from the training loop's .grad."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import chop
from chop.passes.analysis.snip_momentum import SnipMomentum

pytestmark = pytest.mark.usefixtures("one_thread")


def eager_snip(model, x, y):
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(params.values()))
    return {name: (g * p).abs().detach() for (name, p), g in zip(params.items(), grads)}


def test_momentum_over_steps_from_data(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip-momentum", data=mlp_batches[:1])
    first = eager_snip(mlp, *mlp_batches[0])
    for name, value in saliency_of(graph).items():  # no previous score: 0.9·|w·g|
        torch.testing.assert_close(value, 0.9 * first[name], rtol=1e-5, atol=1e-8)
    chop.run(graph, "snip-momentum{alpha=0.5, beta=2.0}", data=mlp_batches[1:])
    second = eager_snip(mlp, *mlp_batches[1])
    for name, value in saliency_of(graph).items():
        expected = 0.5 * 0.9 * first[name] + 2.0 * second[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-8)


def test_source_grad_reads_the_training_loops_gradients(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    x, y = mlp_batches[0]
    nn.functional.cross_entropy(graph.module(x), y).backward()  # a training step's backward
    grads = {name: p.grad.clone() for name, p in mlp.named_parameters()}
    expected = {name: 0.9 * (p.detach() * p.grad).abs() for name, p in mlp.named_parameters()}
    chop.run(graph, "snip-momentum{source=grad}")
    for name, value in saliency_of(graph).items():
        assert torch.equal(value, expected[name])
    for name, p in mlp.named_parameters():
        assert torch.equal(p.grad, grads[name])
    chop.run(graph, "mask{sparsity=0.9}")
    assert graph.weight_node("layers.0.weight").meta["chop"]["mask"].sum() > 0


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.9), (0.9, 1.0), (0.5, 2.0)])
def test_source_grad_accumulates_without_touching_the_stored_scores(mlp, mlp_batches,
                                                                    saliency_of, alpha, beta):
    """The defaults, INC's constants and neither: each takes its own multi-tensor path."""
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    criterion = f"snip-momentum{{source=grad, alpha={alpha}, beta={beta}}}"
    terms = []
    for x, y in mlp_batches[:2]:
        graph.module.zero_grad()
        nn.functional.cross_entropy(graph.module(x), y).backward()
        terms.append({name: (p.detach() * p.grad).abs() for name, p in mlp.named_parameters()})
        chop.run(graph, criterion)
        if len(terms) == 1:
            first = saliency_of(graph)
            kept = {name: value.clone() for name, value in first.items()}
    for name, value in saliency_of(graph).items():
        expected = alpha * beta * terms[0][name] + beta * terms[1][name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9)
        assert torch.equal(first[name], kept[name])  # a step's scores are new tensors


def test_source_grad_without_gradients_says_what_to_do(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    with pytest.raises(chop.DataError, match=r"call loss.backward\(\) before scoring"):
        chop.run(graph, "snip-momentum{source=grad}")


def test_source_grad_names_the_weights_without_gradients_once(mlp, mlp_batches, caplog,
                                                             monkeypatch):
    """A frozen weight scores 0 from .grad, and a global selection empties it first: the
    Pruner scores at every step, so this is said once, naming it."""
    import chop.passes.analysis.snip_momentum as snip_momentum

    monkeypatch.setattr(snip_momentum, "_WARNED", set())  # what earlier tests had said
    model = copy.deepcopy(mlp)
    model.layers[0].weight.requires_grad_(False)
    graph = chop.trace(model, (mlp_batches[0][0],))
    x, y = mlp_batches[0]
    with caplog.at_level("WARNING", logger="chop"):
        for _ in range(3):
            nn.functional.cross_entropy(graph.module(x), y).backward()
            chop.run(graph, "snip-momentum{source=grad}")
    said = [r.getMessage() for r in caplog.records if "have no .grad" in r.getMessage()]
    assert len(said) == 1 and "1 weight(s) have no .grad (frozen, or unused by the loss): " \
        "layers.0.weight. They score 0" in said[0]
    assert not graph.weight_node("layers.0.weight").meta["chop"]["saliency"].any()


def test_scoring_from_data_leaves_the_model_bit_identical(bn_cnn, cnn_batches, unchanged):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    with unchanged(bn_cnn):
        chop.run(graph, "snip-momentum{bn=train}, snip-momentum", data=cnn_batches)


def test_options():
    with pytest.raises(chop.OptionError, match="alpha must be >= 0"):
        SnipMomentum(alpha=-1.0)
    with pytest.raises(chop.OptionError, match="batches=0"):
        SnipMomentum(batches=0)


def test_module_scores_write_the_given_up_previous_scores_in_place(mlp, mlp_batches):
    """The eager path (a Pruner scoring at every step) hands its previous scores over: the
    default constants write the new ones into them, no fresh tensors, same values."""
    x, y = mlp_batches[0]
    params = [p for p in mlp.parameters() if p.dim() == 2]
    nn.functional.cross_entropy(mlp(x), y).backward()
    previous = [torch.rand_like(p) for p in params]
    expected = [torch.add(old, (p.detach() * p.grad).abs(), alpha=0.9)  # what fresh ones hold
                for old, p in zip(previous, params)]
    scores = SnipMomentum(source="grad").score_module(mlp, params, previous=previous)
    assert [s.data_ptr() for s in scores] == [old.data_ptr() for old in previous]
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # scores it cannot reuse (another dtype, a missing one) are left alone: fresh tensors
    kept = [previous[0].double(), None] + previous[2:]
    copies = [None if k is None else k.clone() for k in kept]
    scores = SnipMomentum(source="grad").score_module(mlp, params, previous=kept)
    assert scores[0].data_ptr() != kept[0].data_ptr() and scores[0].dtype == torch.float32
    for old, copy_ in zip(kept, copies):
        assert old is None or torch.equal(old, copy_)
    mlp.zero_grad(set_to_none=True)
