"""exact-salience: against a brute-force loop that zeroes each weight of the eager model."""

from __future__ import annotations

import copy

import pytest
import scipy.stats
import torch
from torch import nn

import chop
from chop.passes.analysis.exact_salience import ExactSalience
from chop.passes.analysis.ranks import ranks, spearman

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(model, batches, names=None, train=False, entries=None):
    """|Σ_b L_b(w) − L_b(w_j = 0)| by zeroing one weight at a time (float64, eager)."""
    model = copy.deepcopy(model).double().train(train)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0

    def total():
        return sum(float(nn.functional.cross_entropy(model(x.double()), y)) for x, y in batches)

    result = {}
    with torch.no_grad():
        base = total()
        for name, p in model.named_parameters():
            if names is not None and name not in names:
                continue
            flat = p.view(-1)
            score = torch.zeros(flat.numel(), dtype=torch.float64)
            for j in (range(flat.numel()) if entries is None else entries):
                saved = flat[j].clone()
                flat[j] = 0
                score[j] = abs(base - total())
                flat[j] = saved
            result[name] = score.view(p.shape)
    return result


def test_exact_salience_equals_brute_force(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "exact-salience{batches=2, chunk=100}", data=mlp_batches)
    expected = brute_force(mlp, mlp_batches[:2])
    got = saliency_of(graph)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-12, msg=name)


def test_batchnorm_in_train_mode_uses_batch_statistics(bn_cnn, cnn_batches, unchanged, saliency_of):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    with unchanged(bn_cnn):
        chop.run(graph, "exact-salience{bn=train, params=prunable}", data=cnn_batches)
    entries = [0, 5, 100, 215]
    expected = brute_force(bn_cnn, cnn_batches[:1], names={"conv1.weight"}, train=True,
                           entries=entries)["conv1.weight"].reshape(-1)[entries]
    got = saliency_of(graph)["conv1.weight"].reshape(-1)[entries]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert set(saliency_of(graph)) == {"conv1.weight", "conv2.weight", "fc.weight"}


def test_masked_weights_score_zero_and_mask_works_after(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.5}, exact-salience", data=mlp_batches)
    first = graph.history[1].info["kept"]
    for node in graph.weight_nodes():
        mask = node.meta["chop"].get("mask")
        if mask is not None:
            score = node.meta["chop"]["saliency"]
            assert (score[~mask] == 0).all() and (score[mask] > 0).any()
    chop.run(graph, "mask{sparsity=0.8}")
    kept = graph.history[-1].info["kept"]
    assert sum(k for k, _ in kept.values()) == round(0.2 * sum(n for _, n in first.values()))


def test_spearman_with_snip_is_reported(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip", data=mlp_batches)
    snip = saliency_of(graph)
    chop.run(graph, "exact-salience", data=mlp_batches)
    info = graph.history[-1].info
    exact = saliency_of(graph)
    expected = scipy.stats.spearmanr(
        torch.cat([snip[n].reshape(-1) for n in snip]).numpy(),
        torch.cat([exact[n].reshape(-1) for n in snip]).numpy(),
    ).statistic
    assert info["compared_with"] == "snip"
    assert info["spearman"] == pytest.approx(expected, abs=1e-9)
    assert info["spearman"] > 0.5  # SNIP is a decent first-order approximation here
    alone = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(alone, "exact-salience", data=mlp_batches)
    assert "spearman" not in alone.history[-1].info


def test_ranks_and_spearman_handle_ties():
    values = torch.tensor([3.0, 1.0, 3.0, 0.0, 1.0, 1.0])
    assert torch.equal(ranks(values), torch.from_numpy(scipy.stats.rankdata(values.numpy())))
    a = [torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([[5.0, 0.0]])]
    b = [torch.tensor([1.0, 0.0, 0.0, 3.0]), torch.tensor([[4.0, 4.0]])]
    expected = scipy.stats.spearmanr([0, 0, 1, 2, 5, 0], [1, 0, 0, 3, 4, 4]).statistic
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)


def test_refuses_large_models_with_the_fix(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    with pytest.raises(chop.OptionError, match=r"above max_weights=100; raise max_weights"):
        chop.run(graph, "exact-salience{max_weights=100}", data=mlp_batches)
    with pytest.raises(chop.OptionError, match="chunk=0 must be at least 1"):
        ExactSalience(chunk=0)


def test_a_graph_with_baked_dtypes_says_to_use_the_model_dtype():
    """The batch's forward wrapped the dtype error as a DataError blaming the data."""

    class CastsToFloat32(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.to(torch.float32))  # torch.export records a dtype check

    graph = chop.trace(CastsToFloat32(), (torch.ones(2, 4),))
    batches = [(torch.randn(2, 4), torch.tensor([0, 2]))]
    with pytest.raises(chop.DataError, match="cannot run in torch.float64: pass dtype=model"):
        chop.run(graph, "exact-salience", data=batches)
    chop.run(graph, "exact-salience{dtype=model}", data=batches)
