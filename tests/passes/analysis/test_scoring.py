"""Data-parallel scoring on 2 gloo ranks: each rank scores its own batches, every gradient
criterion sums what it accumulates over the ranks, so both ranks hold bit-identical saliency and
masks, equal to one process scoring all the batches (the scores up to float rounding; the masks
exactly, on tie-free scores); ``distributed=off`` scores the rank's own batches only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chop
from chop.passes.analysis.criterion import DataCriterion
from chop.pipeline import registry

CRITERIA = ["snip", "snip{accumulate=sum-of-abs}", "gradient", "gradient{accumulate=sum-of-abs}",
            "grasp", "snip2", "snip2{hessian=hutchinson, samples=4}", "snip-momentum",
            "exact-salience", "snip-momentum{source=grad}"]  # all with batches=every batch given


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(4)]


def score(criterion: str, data: list, grads_from: list | None = None) -> tuple[dict, dict, dict]:
    """Saliency, masks at 70% sparsity and the criterion's info after ``criterion, mask`` on a
    fresh Net; ``grads_from``: batches whose summed loss leaves the .grad that
    ``source=grad`` reads."""
    torch.manual_seed(0)
    model = Net()
    graph = chop.trace(model, (data[0][0],))
    if grads_from is not None:
        sum(nn.functional.cross_entropy(graph.module(x), y) for x, y in grads_from).backward()
    name, _, options = criterion.rstrip("}").partition("{")
    every = f"batches={len(data)}" + (f", {options}" if options else "")
    chop.run(graph, f"{name}{{{every}}}, mask{{sparsity=0.7}}", data=data)
    nodes = [n for n in graph.weight_nodes() if "saliency" in n.meta["chop"]]
    return ({n.target: n.meta["chop"]["saliency"] for n in nodes},
            {n.target: n.meta["chop"]["mask"] for n in nodes if "mask" in n.meta["chop"]},
            graph.history[0].info)


def on_rank(rank, world, criteria):
    """Each criterion on this rank's batches (every other one) with the process group up."""
    mine = batches()[rank::world]
    return {c: score(c, mine, mine if "source=grad" in c else None) for c in criteria}


def test_every_gradient_criterion_has_the_option():
    for name, cls in registry.all_passes().items():
        if issubclass(cls, DataCriterion) or name == "iterative-snip":
            assert cls.from_options({}).distributed == "auto", name


def test_every_rank_scores_all_ranks_batches_alike(ranks):
    zero, one = ranks.run(on_rank, CRITERIA)
    for criterion in CRITERIA:
        saliency, masks, info = zero[criterion]
        assert info["ranks"] == 2, criterion
        other_saliency, other_masks, _ = one[criterion]
        for name in saliency:  # bit-identical on every rank
            assert torch.equal(saliency[name], other_saliency[name]), (criterion, name)
        assert all(torch.equal(masks[k], other_masks[k]) for k in masks), criterion
        if "hutchinson" in criterion:
            continue  # every rank draws the same vectors: not one process's draws
        data = batches()
        expected, expected_masks, alone = score(criterion, data, data if "source=grad" in
                                                criterion else None)
        assert "ranks" not in alone
        for name in expected:
            torch.testing.assert_close(saliency[name], expected[name], rtol=1e-4, atol=1e-7,
                                       msg=f"{criterion} {name}")
        assert all(torch.equal(masks[k], expected_masks[k]) for k in masks), criterion


def off_on_rank(rank, world):
    mine = batches()[rank::world]
    return score("snip{distributed=off}", mine)[0]


def test_distributed_off_scores_the_ranks_own_batches(ranks):
    for rank, saliency in enumerate(ranks.run(off_on_rank)):
        expected = score("snip", batches()[rank::2])[0]
        assert all(torch.equal(saliency[k], expected[k]) for k in expected)


@pytest.mark.parametrize("accumulate", ["abs-of-sum", "sum-of-abs"])
def test_the_eager_loop_equals_the_graph_loop(accumulate):
    from chop.passes.analysis.scoring import module_backward_sums

    data = batches()
    torch.manual_seed(0)
    model = Net()
    params = [model.fc1.weight, model.fc2.bias]
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = score(f"snip{{accumulate={accumulate}}}", data)[0]  # on all 4 batches
    got = module_backward_sums(model, params, data, None, "snip", accumulate=accumulate)
    torch.testing.assert_close(got[0], expected["fc1.weight"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], expected["fc2.bias"], rtol=1e-5, atol=1e-7)
    assert torch.equal(model.fc1.weight.grad, torch.ones_like(model.fc1.weight))
    assert model.fc2.weight.grad is None and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def on_rank_shared(rank, world, criteria):
    """Every rank is given all the batches (shared_data): each scores its share of them."""
    out = {}
    for criterion in criteria:
        torch.manual_seed(0)
        data = batches()
        graph = chop.trace(Net(), (data[0][0],))
        chop.run(graph, f"{criterion}{{batches={len(data)}}}, mask{{sparsity=0.7}}", data=data,
                 shared_data=True)
        out[criterion] = ({n.target: n.meta["chop"]["mask"] for n in graph.weight_nodes()
                           if "mask" in n.meta["chop"]}, graph.history[0].info,
                          {n.target: n.meta["chop"]["saliency"] for n in graph.weight_nodes()})
    return out


def test_shared_data_is_split_over_the_ranks(ranks):
    """The CLI under torchrun hands every rank the same batches: together the ranks score each
    batch once, and the masks equal one process scoring all of them."""
    criteria = ["snip", "gradient", "iterative-snip"]
    results = ranks.run(on_rank_shared, criteria)
    for criterion in criteria:
        masks = [r[criterion][0] for r in results]
        saliency, expected, _ = score(criterion, batches())
        for name, mask in expected.items():
            assert torch.equal(masks[0][name], mask), (criterion, name)
            assert torch.equal(masks[1][name], mask), (criterion, name)
        if criterion != "iterative-snip":  # each batch scored once: the same sums, not twice
            for name, value in saliency.items():
                torch.testing.assert_close(results[0][criterion][2][name], value)
    assert results[0]["snip"][1]["ranks"] == 2


def exact_on_one_batch(rank, world):
    torch.manual_seed(0)
    data = batches()[:1]  # shared by 2 ranks: rank 1 is given no batch to score
    graph = chop.trace(Net(), (data[0][0],))
    chop.run(graph, "exact-salience{batches=1}", data=data, shared_data=True)
    return {n.target: n.meta["chop"]["saliency"] for n in graph.weight_nodes()}


def test_a_rank_without_batches_adds_zeros_to_exact_salience(ranks):
    """The rank given no batch stacked an empty list of losses (an InternalError there, a
    timeout on the others)."""
    zero, one = ranks.run(exact_on_one_batch)
    torch.manual_seed(0)
    saliency, _, _ = score("exact-salience", batches()[:1])
    for name, expected in saliency.items():
        torch.testing.assert_close(zero[name], expected)
        assert torch.equal(zero[name], one[name])


class Counting(nn.Module):
    """A model whose eval-mode forward changes a buffer in place (a call counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x) * self.scale


def test_scoring_restores_the_buffers_a_forward_changes_every_time():
    from chop.passes.analysis.scoring import scoring

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    graph = chop.trace(Counting(), (x,))
    before = {k: v.clone() for k, v in graph.module.named_buffers()}
    for _ in range(3):  # the first run copies every buffer, later ones only what changed
        chop.run(graph, "snip", data=[(x, y)])
        for name, value in graph.module.named_buffers():
            assert torch.equal(value, before[name]), name
    # what scoring saves is learnt from the first run; a buffer that a later run changes
    # against that is a bug chop reports instead of leaving the buffer changed silently
    with pytest.raises(chop.InternalError, match=r"scoring changed buffers it had not changed "
                                                 r"before \(scale\)"):
        with scoring(graph, [graph.weight_node("fc.weight")]):
            graph.module.get_buffer("scale").mul_(2)


def test_a_graph_scored_once_runs_its_plain_code_and_lean_code_from_the_second_scoring(
        cnn, cnn_batches, monkeypatch):
    import chop.ir.graph as graph_module

    made = []
    real = graph_module._lean_code
    monkeypatch.setattr(graph_module, "_lean_code", lambda m: made.append(m) or real(m))
    graph = chop.trace(cnn, (cnn_batches[0][0],))
    scores, generated = [], []
    for _ in range(3):
        chop.run(graph, "snip", data=cnn_batches[:1])
        scores.append({n.target: n.meta["chop"]["saliency"].clone() for n in graph.weight_nodes()})
        generated.append(len(made))
    assert generated == [0, 1, 1]  # generated for the second scoring, reused by the third
    for later in scores[1:]:  # the lean code computes exactly what the plain code does
        assert all(torch.equal(later[k], v) for k, v in scores[0].items())


def _losses(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets)


@pytest.mark.parametrize(("loss", "message"), [
    (lambda out, y: (out.argmax(1) == y).sum(), "is a int64 tensor; it must be a real "
                                                "floating-point scalar"),
    (lambda out, y: _losses(out, y).detach(), "does not depend on the model's weights"),
    (lambda out, y: _losses(out, y) * float("nan"), "the loss of batch 0 is nan"),
])
@pytest.mark.parametrize("criterion", ["snip", "grasp"])
def test_a_loss_that_cannot_be_differentiated_is_a_data_error(mlp, mlp_batches, criterion,
                                                              loss, message):
    """An accuracy, a detached or a NaN loss reached torch.autograd.grad: a RuntimeError,
    reported as a bug in chop, or NaN scores."""
    graph = chop.trace(mlp, (mlp_batches[0][0][:2],))
    with pytest.raises(chop.DataError, match=message):
        chop.run(graph, criterion, data=mlp_batches, loss=loss)


def test_a_nan_loss_from_a_nan_weight_names_the_weight(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0][:2],))
    weight = next(n for n in graph.weight_nodes() if n.meta["chop"]["role"] == "linear").target
    with torch.no_grad():
        graph.parameter(weight)[0, 0] = float("nan")
    with pytest.raises(chop.DataError, match=rf"the loss of batch 0 is nan, and the model's "
                                             rf"{weight} holds NaN or inf"):
        chop.run(graph, "snip", data=mlp_batches)


def test_a_one_element_loss_is_a_scalar_to_every_criterion(mlp, mlp_batches):
    """A loss of shape (1,) worked in snip and broke exact-salience's shapes."""
    scalar = chop.run(chop.trace(mlp, (mlp_batches[0][0][:2],)), "exact-salience",
                      data=mlp_batches[:1])
    one = chop.run(chop.trace(mlp, (mlp_batches[0][0][:2],)), "exact-salience",
                   data=mlp_batches[:1], loss=lambda out, y: _losses(out, y).reshape(1))
    for a, b in zip(scalar.weight_nodes(), one.weight_nodes()):
        torch.testing.assert_close(a.meta["chop"]["saliency"], b.meta["chop"]["saliency"])
