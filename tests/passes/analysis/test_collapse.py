"""collapse: empty layers, and effective weights checked against brute-force path enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import chop
from chop.errors import MissingMetadataError
from chop.ir import meta
from chop.ir.masks import insert_mask
from chop.passes.analysis.collapse import effective_masks, report_summary, summary_line


def masked(graph: chop.Graph, given: dict[str, torch.Tensor]) -> chop.Graph:
    for name, mask in given.items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    return graph


def brute_force(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """A kept weight (i <- j) of layer l is effective iff some path input -> ... -> j and some
    path i -> ... -> output exist through kept weights: enumerate every full path."""
    sizes = [layers[0].shape[1]] + [m.shape[0] for m in layers]
    effective = [torch.zeros_like(m) for m in layers]
    for path in itertools.product(*(range(s) for s in sizes)):
        if all(layers[l][path[l + 1], path[l]] for l in range(len(layers))):
            for l in range(len(layers)):
                effective[l][path[l + 1], path[l]] = True
    return effective


class Chain(nn.Module):
    def __init__(self, sizes=(4, 5, 5, 3)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu(x) if i < len(self.layers) - 1 else x
        return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effective_weights_match_brute_force(seed):
    torch.manual_seed(seed)
    model = Chain()
    g = torch.Generator().manual_seed(seed)
    given = {f"layers.{i}.weight": torch.rand(model.layers[i].weight.shape, generator=g) < 0.35
             for i in range(3)}
    graph = masked(chop.trace(model, (torch.randn(2, 4),)), given)
    state = {k: v.clone() for k, v in graph.module.state_dict().items()}
    chop.run(graph, "collapse")
    expected = brute_force([given[f"layers.{i}.weight"] for i in range(3)])
    info = graph.history[-1].info
    for i, want in enumerate(expected):
        name = f"layers.{i}.weight"
        assert torch.equal(meta.entries(graph.weight_node(name))["effective"], want)
        assert info["layers"][name]["effective"] == int(want.sum())
    kept = sum(int(m.sum()) for m in given.values())
    effective = sum(int(m.sum()) for m in expected)
    assert info["totals"]["kept"] == kept and info["totals"]["effective"] == effective
    assert info["totals"]["effective_sparsity"] == pytest.approx(1 - effective / 60)
    after = graph.module.state_dict()  # nothing changed: values, dtypes, devices
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())


def test_some_kept_weights_are_disconnected_by_hand():
    model = Chain((2, 2, 2))
    w0 = torch.tensor([[True, False], [False, False]])  # only input 0 -> hidden 0
    w1 = torch.tensor([[False, True], [True, False]])  # hidden 1 -> out 0 (hidden 1 unreachable)
    graph = masked(chop.trace(model, (torch.randn(2, 2),)), {"layers.0.weight": w0,
                                                              "layers.1.weight": w1})
    effective = effective_masks(graph)
    assert torch.equal(effective["layers.0.weight"], w0)  # hidden 0 reaches out 1
    assert torch.equal(effective["layers.1.weight"], torch.tensor([[False, False], [True, False]]))


def test_max_pooling_keeps_every_window_element_connected():
    class ConvPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)

        def forward(self, x):
            return torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)

    # kept taps (0,0) and (2,2) on a 2x2 input: the all-ones input ties the window's maximum,
    # and max-pooling would route the gradient to one element only, hiding tap (0,0).
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 0, 2, 2] = True
    graph = masked(chop.trace(ConvPool(), (torch.randn(2, 1, 2, 2),)), {"conv.weight": mask})
    assert torch.equal(effective_masks(graph)["conv.weight"], mask)


def test_empty_layer_disconnects_everything_and_is_reported(cnn, cnn_batches, caplog):
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, "snip, mask{sparsity=0.5}", data=cnn_batches)
    fc = meta.entries(graph.weight_node("fc.weight"))["mask"]
    masked(graph, {"fc.weight": torch.zeros_like(fc)})
    chop.run(graph, "collapse", data=cnn_batches)
    info = graph.history[-1].info
    assert info["empty"] == ["fc.weight"]
    assert set(info["disconnected"]) == {"conv1.weight", "conv2.weight"}
    assert info["totals"]["effective"] == 0 and info["totals"]["effective_sparsity"] == 1.0
    assert "layer collapse" in caplog.text
    report = {"pipeline": [{"name": "collapse", "info": info}]}
    assert report_summary(report) == info
    assert "empty: fc.weight" in summary_line(info)


def test_collapse_needs_masks(cnn_graph):
    with pytest.raises(MissingMetadataError, match="mask"):
        chop.run(cnn_graph, "collapse")


@pytest.mark.parametrize("refused", [False, True])
def test_float_inputs_count_paths_on_two_samples_of_the_batch_or_else_all(
        refused, cnn, cnn_batches, monkeypatch):
    """All-ones samples are all one sample: the first two give what the whole batch gives."""
    import chop.passes.analysis.collapse as collapse

    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, "magnitude, mask{sparsity=0.5}")
    fc = meta.entries(graph.weight_node("fc.weight"))["mask"].clone()
    fc[:, : fc.shape[1] // 2] = False  # half the last features read by nothing: their paths end
    masked(graph, {"fc.weight": fc})
    wanted = {k: v.clone() for k, v in effective_masks(graph, [cnn_batches[0]]).items()}
    kept = sum(int(meta.entries(graph.weight_node(k))["mask"].sum()) for k in wanted)
    whole = cnn_batches[0][0].shape[0]
    real, seen = collapse.call, []

    def spy(module, inputs):  # the batch each path count runs on
        seen.append(inputs.shape[0])
        return real(module, inputs)

    monkeypatch.setattr(collapse, "call", spy)
    if refused:  # cut inputs the graph refuses (a wrong width): the whole batch
        monkeypatch.setattr(collapse, "cut_batch", lambda module, x, positions: x[:2, :1])
    got = effective_masks(graph, [cnn_batches[0]])
    assert seen == ([2, whole] if refused else [2])
    assert got.keys() == wanted.keys() and all(torch.equal(got[k], wanted[k]) for k in got)
    assert 0 < sum(int(m.sum()) for m in got.values()) < kept  # some kept weights lead nowhere


def test_integer_inputs_count_paths_on_the_whole_batch(monkeypatch):
    """Token ids pick the embedding rows a path starts from: no sample can stand for another."""
    import chop.passes.analysis.collapse as collapse

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ids = torch.randint(0, 50, (6, 5))
    graph = chop.trace(model, (ids,))
    chop.run(graph, "magnitude, mask{sparsity=0.5}")
    real, seen = collapse.call, []
    monkeypatch.setattr(collapse, "call", lambda module, x: seen.append(x.shape) or real(module, x))
    effective_masks(graph, [(ids, None)])
    assert seen == [(6, 5)]
