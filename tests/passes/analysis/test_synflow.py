"""synflow: against a hand-written iterative SynFlow on the eager model in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import chop
from chop.passes.analysis.synflow import Synflow

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_synflow(model, shape, prunable, sparsity, iterations):
    """SynFlow as its authors wrote it: |θ| for every state_dict entry, eval mode, all-ones
    input, R = sum of outputs, global top-k masks with keep^(t/T) between rounds."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.abs_()
    params = dict(model.named_parameters())
    base = {name: p.detach().clone() for name, p in params.items()}
    masks = {name: torch.ones_like(base[name], dtype=torch.bool) for name in prunable}
    total = sum(base[n].numel() for n in prunable)

    def top(scores, keep):
        flat = torch.cat([scores[n].reshape(-1) for n in prunable])
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[flat.argsort(descending=True, stable=True)[: math.floor(keep * total + 0.5)]] = True
        return dict(zip(prunable, (c.view(base[n].shape) for c, n in zip(chosen.split(
            [base[n].numel() for n in prunable]), prunable))))

    for t in range(1, iterations + 1):
        with torch.no_grad():
            for name in prunable:
                params[name].copy_(base[name] * masks[name])
        model.zero_grad()
        model(torch.ones(shape, dtype=torch.float64)).sum().backward()
        scores = {name: (p.grad * p).detach().abs() for name, p in params.items()}
        if t < iterations:
            masks = top(scores, (1 - sparsity) ** (t / iterations))
    return scores, top(scores, 1 - sparsity)


@pytest.mark.parametrize("which, sparsity, iterations", [
    ("mlp", 0.95, 10), ("bn_cnn", 0.9, 8), ("mlp", 0.5, 1),
])
def test_synflow_equals_the_reference_and_mask_keeps_its_final_mask(
    request, mlp_batches, cnn_batches, which, sparsity, iterations, saliency_of
):
    model = request.getfixturevalue(which)
    x = (mlp_batches if which == "mlp" else cnn_batches)[0][0]
    graph = chop.trace(model, (x,))
    prunable = [n.target for n in graph.weight_nodes()
                if n.meta["chop"]["role"] in ("linear", "conv")]
    chop.run(graph, f"synflow{{sparsity={sparsity}, iterations={iterations}}}, "
                    f"mask{{sparsity={sparsity}}}")
    scores, masks = reference_synflow(model, x.shape, prunable, sparsity, iterations)
    got = saliency_of(graph)
    assert got.keys() == scores.keys()
    for name in got:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], scores[name], rtol=1e-10, atol=0, msg=name)
    for name in prunable:
        assert torch.equal(graph.weight_node(name).meta["chop"]["mask"], masks[name]), name
    assert graph.history[0].info["sparsity"] == sparsity


def test_iterations_avoid_the_layer_collapse_of_one_shot_synflow(mlp, mlp_batches):
    """SynFlow's argument: one-shot scores conserve flow per layer, so the largest layers score
    lowest per weight and a global 98% mask empties them; iterating keeps every layer alive."""
    x = mlp_batches[0][0]
    prunable = ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    kept = {}
    for iterations in (1, 20):
        graph = chop.trace(mlp, (x,))
        chop.run(graph, f"synflow{{sparsity=0.98, iterations={iterations}}}, mask{{sparsity=0.98}}")
        _, masks = reference_synflow(mlp, x.shape, prunable, 0.98, iterations)
        for name in prunable:
            assert torch.equal(graph.weight_node(name).meta["chop"]["mask"], masks[name]), name
        kept[iterations] = {name: k for name, (k, _) in graph.history[-1].info["kept"].items()}
    assert kept[1] == {"layers.0.weight": 0, "layers.1.weight": 0, "layers.2.weight": 33}
    assert min(kept[20].values()) > 0 and sum(kept[20].values()) == 33


def test_synflow_is_data_free_and_leaves_the_model_bit_identical(bn_cnn, cnn_batches, unchanged):
    graph = chop.trace(bn_cnn, (cnn_batches[0][0],))
    graph.train()
    with unchanged(bn_cnn):
        chop.run(graph, "synflow{iterations=3}")
    assert graph.training
    for node in graph.weight_nodes():
        assert node.meta["chop"]["saliency"].shape == graph.parameter(node).shape


def test_options():
    with pytest.raises(chop.OptionError, match="sparsity=1.0 is out of range"):
        Synflow(sparsity=1.0)
    with pytest.raises(chop.OptionError, match="iterations=0 must be at least 1"):
        Synflow(iterations=0)


class CastsToFloat32(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.to(torch.float32))  # torch.export records the cast and a dtype check


def test_a_graph_with_baked_dtypes_says_to_use_the_model_dtype(saliency_of):
    graph = chop.trace(CastsToFloat32(), (torch.ones(2, 4),))
    with pytest.raises(chop.DataError, match="cannot run in torch.float64: pass dtype=model"):
        chop.run(graph, "synflow{iterations=2}")
    chop.run(graph, "synflow{iterations=2, dtype=model}, mask{sparsity=0.5}")
    assert saliency_of(graph)["fc.weight"].dtype == torch.float32
