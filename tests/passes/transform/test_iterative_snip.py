"""iterative-snip: exact kept counts every round, nested masks without regrowth, FORCE's saliency
(gradient at the masked weight times the weight), and a different mask from one-shot SNIP."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import chop
from chop.errors import OptionError
from chop.ir import meta
from chop.ir.masks import MASK_OF
from chop.passes.analysis.snip import snip_saliency
from chop.passes.transform.iterative_snip import IterativeSnip, step_sparsity, straight_through

PRUNABLE = ["conv1.weight", "conv2.weight", "fc.weight"]


def masks(graph):
    return {n.target: meta.entries(n)["mask"].clone() for n in graph.weight_nodes()
            if "mask" in meta.entries(n)}


def total_kept(graph) -> int:
    return sum(int(m.sum()) for m in masks(graph).values())


@pytest.mark.parametrize("regrowth", [False, True])
def test_exact_counts_every_round_and_differs_from_one_shot(cnn, cnn_batches, regrowth):
    sparsity, steps = 0.98, 4
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, IterativeSnip(sparsity=sparsity, steps=steps, allow_regrowth=regrowth),
             data=cnn_batches)
    total = sum(m.numel() for m in masks(graph).values())
    rounds = graph.history[-1].info["rounds"]
    expected = [math.floor((1 - sparsity) ** (t / steps) * total + 0.5) for t in range(1, steps + 1)]
    expected[-1] = math.floor((1 - sparsity) * total + 0.5)
    assert rounds == expected
    assert total_kept(graph) == expected[-1]
    assert sorted(masks(graph)) == PRUNABLE

    once = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(once, f"snip, mask{{sparsity={sparsity}}}", data=cnn_batches)
    assert total_kept(once) == total_kept(graph)
    a, b = masks(graph), masks(once)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_one_pass_iterator_scores_the_same_batches_every_round(cnn, cnn_batches):
    """Round t read batch t of a generator (the next ones), not the first batch again."""
    lists = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(lists, IterativeSnip(sparsity=0.9, steps=3), data=cnn_batches)
    once = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(once, IterativeSnip(sparsity=0.9, steps=3), data=iter(cnn_batches))
    a, b = masks(lists), masks(once)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_regrowth_each_round_is_a_subset_of_the_previous(cnn, cnn_batches):
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    first = step_sparsity(0.95, 1, 2)
    chop.run(graph, f"snip, mask{{sparsity={first}}}", data=cnn_batches)
    round1 = masks(graph)
    chop.run(graph, IterativeSnip(sparsity=0.95, steps=1), data=cnn_batches)  # round 2 of 2
    round2 = masks(graph)
    assert all(not (round2[k] & ~round1[k]).any() for k in round1)
    # and the two-round pass does the same in one go
    fresh = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(fresh, "iterative-snip{sparsity=0.95, steps=2}", data=cnn_batches)
    assert all(torch.equal(masks(fresh)[k], round2[k]) for k in round2)


def test_masks_sparser_than_the_first_round_are_refused_without_regrowth(cnn, cnn_batches):
    """Round 1 kept more weights than the masks did: the pruned ones, ranked last and tied,
    came back by position (flat indices 0, 1, 2, ... of each layer)."""
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, "snip, mask{sparsity=0.95}", data=cnn_batches)
    before = masks(graph)
    with pytest.raises(OptionError, match=r"already prune 95\.0% of the weights it selects, more "
                                          r"than its first round's sparsity 29\.3%"):
        chop.run(graph, "iterative-snip{sparsity=0.5, steps=2}", data=cnn_batches)
    assert all(torch.equal(masks(graph)[k], m) for k, m in before.items())  # left as they were
    with pytest.raises(OptionError,
                       match=r"prune 77\.3% of the weights it selects of conv1\.weight"):
        chop.run(graph, "iterative-snip{sparsity=0.5, steps=2, scope=local}", data=cnn_batches)
    chop.run(graph, "iterative-snip{sparsity=0.5, steps=2, allow_regrowth=true}", data=cnn_batches)


def test_force_saliency_is_masked_weight_gradient_times_weight(cnn, cnn_batches):
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, "snip, mask{sparsity=0.7}", data=cnn_batches)
    weights = {k: graph.parameter(k).detach().clone() for k in PRUNABLE}
    with straight_through(graph):
        got = snip_saliency(graph, cnn_batches, batches=2)
    targets = [n.target for n in graph.module.graph.nodes if MASK_OF in n.meta.get("chop", {})]
    assert targets == [torch.ops.aten.mul.Tensor] * 3  # the mask nodes are restored
    assert not [b for b, _ in graph.module.named_buffers() if "offset" in b]
    assert all(torch.equal(graph.parameter(k), weights[k]) for k in PRUNABLE)

    eager = copy.deepcopy(cnn).eval()  # independent: differentiate at the masked weights
    current = masks(graph)
    with torch.no_grad():
        for name in PRUNABLE:
            eager.get_parameter(name).mul_(current[name])
    params = [eager.get_parameter(k) for k in PRUNABLE]
    loss = sum(torch.nn.functional.cross_entropy(eager(x), y) for x, y in cnn_batches[:2])
    grads = torch.autograd.grad(loss, params)
    for name, grad in zip(PRUNABLE, grads):
        torch.testing.assert_close(got[name], (grad * weights[name]).abs())
        assert (got[name][~current[name]] > 0).any()  # pruned weights can score: may regrow


def test_options_are_checked_with_the_pass_name():
    with pytest.raises(OptionError, match="iterative-snip: sparsity"):
        IterativeSnip(sparsity=1.0)
    with pytest.raises(OptionError, match="steps"):
        IterativeSnip(steps=0)
    with pytest.raises(OptionError, match="granularity"):
        IterativeSnip(sparsity=None, granularity="2:4")
    assert IterativeSnip(scope="local", min_keep=3).mask_pass(0.5).min_keep == 3


def mlp_rounds(batches, regrowth: bool, options: str = "") -> dict:
    """The masks of iterative-snip (3 rounds, 90%) on a fresh seeded MLP scoring ``batches``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    graph = chop.trace(model, (batches[0][0],))
    chop.run(graph, f"iterative-snip{{sparsity=0.9, steps=3, batches={len(batches)}, "
                    f"allow_regrowth={str(regrowth).lower()}{options}}}", data=batches)
    return masks(graph)


def mlp_batches(count: int = 4) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
            for _ in range(count)]


def rounds_on_rank(rank, world):
    mine = mlp_batches()[rank::world]
    return {regrowth: mlp_rounds(mine, regrowth) for regrowth in (False, True)}, mlp_rounds(
        mine, False, ", distributed=off")


def test_every_rank_masks_like_one_process_on_all_batches(ranks):
    zero, one = ranks.run(rounds_on_rank)
    for regrowth in (False, True):
        expected = mlp_rounds(mlp_batches(), regrowth)
        for got in (zero[0][regrowth], one[0][regrowth]):
            assert all(torch.equal(got[k], expected[k]) for k in expected), regrowth
    for rank, (_, alone) in enumerate((zero, one)):  # distributed=off: the rank's own batches
        expected = mlp_rounds(mlp_batches()[rank::2], False)
        assert all(torch.equal(alone[k], expected[k]) for k in expected)
