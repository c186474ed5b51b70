"""channels-last: conv weights stored NHWC (NDHWC), same values, same outputs, kept by .pt2."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

import chop
from chop.cli.outputs import export_program
from chop.ir.graph import strides_of


class Mixed(nn.Module):
    """A 2-D conv, a 3-D conv, a 4-D parameter added (not a conv weight), a linear: only the
    conv weights change layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 8))
        self.bn = nn.BatchNorm2d(8)
        self.conv3d = nn.Conv3d(2, 2, 3, padding=1)
        self.fc = nn.Linear(8 + 2, 4)

    def forward(self, x, v):
        a = torch.relu(self.bn(self.conv(x) + self.pos)).mean((2, 3))
        b = self.conv3d(v).mean((2, 3, 4))
        return self.fc(torch.cat([a, b], 1))


def test_conv_weights_become_channels_last_with_the_same_values_and_outputs():
    torch.manual_seed(0)
    model = Mixed().eval()
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 2, 4, 4, 4)
    graph = chop.trace(model, (x[:2], v[:2])).eval()
    with torch.no_grad():
        before = graph(x, v)
    values = {k: p.detach().clone() for k, p in graph.module.named_parameters()}
    chop.run(graph, "channels-last{timing=true}", data=[((x, v), torch.zeros(4, dtype=torch.long))])
    info = graph.history[-1].info
    assert info["converted"] == ["conv.weight", "conv3d.weight"]
    assert len(info["model_latency_us"]) == 2
    assert graph.parameter("conv.weight").is_contiguous(memory_format=torch.channels_last)
    assert not graph.parameter("conv.weight").is_contiguous()
    assert graph.parameter("conv3d.weight").is_contiguous(memory_format=torch.channels_last_3d)
    assert graph.parameter("fc.weight").is_contiguous() and graph.parameter("pos").is_contiguous()
    for name, value in graph.module.named_parameters():
        assert torch.equal(value, values[name]), name
    assert model.conv.weight.is_contiguous()  # the traced model is left alone
    with torch.no_grad():
        torch.testing.assert_close(graph(x, v), before)
    chop.run(graph, "channels-last")  # already converted: nothing to do
    assert graph.history[-1].info["converted"] == [] and not graph.history[-1].modified
    buffer = io.BytesIO()
    torch.export.save(export_program(graph, (x, v)), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert loaded.state_dict["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loaded.module()(x, v), before)


def test_analyses_survive_and_the_channels_last_graph_still_trains(cnn, cnn_batches):
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, "magnitude, mask{sparsity=0.5}, channels-last")
    assert "mask" in graph.weight_node("conv1.weight").meta["chop"]  # values unchanged: kept
    assert "saliency" in graph.weight_node("conv1.weight").meta["chop"]
    loss = graph(cnn_batches[0][0]).square().mean()
    loss.backward()  # channels-last parameters train like any others
    assert graph.parameter("conv1.weight").grad is not None


def test_pointwise_and_depthwise_convs_are_restrided_as_module_to_does(tmp_path):
    # their kernels are contiguous in both formats, but a conv reads the layout from the
    # strides: a MobileNet's 1x1 and depthwise weights were left NCHW, and so was the model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(2, 8, 6, 6)
    graph = chop.trace(model, (x,)).eval()
    with torch.no_grad():
        before = graph(x)
    chop.run(graph, "channels-last")
    assert graph.history[-1].info["converted"] == ["0.weight", "2.weight", "4.weight"]
    eager = model.to(memory_format=torch.channels_last)
    for name, value in graph.module.named_parameters():
        assert value.stride() == eager.get_parameter(name).stride(), name
    with torch.no_grad():
        after = graph(x)
    assert after.is_contiguous(memory_format=torch.channels_last) and not after.is_contiguous()
    torch.testing.assert_close(after, before)
    chop.run(graph, "channels-last")
    assert graph.history[-1].info["converted"] == []
    with warnings.catch_warnings(record=True) as caught:  # torch's "No complete tensor found"
        warnings.simplefilter("always")
        chop.save(graph, tmp_path / "out", x)
    assert not [w for w in caught if "complete tensor" in str(w.message)]


def _separable() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, groups=16, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()


def _conv_strides(named: dict) -> dict:
    """name -> (strides, channels-last strides of its shape) of each 4-D weight."""
    return {k: (v.stride(), strides_of(v.shape, torch.channels_last)) for k, v in named.items()
            if k.endswith("weight") and v.dim() == 4}


def test_passes_after_channels_last_and_the_saved_model_keep_the_layout(tmp_path):
    """fold (weight × mask), shrink (sliced weights), fold-bn (scaled weights) and chop.save's
    mask folding replace conv weights: a 1×1 or depthwise product came out row-major, and the
    model ran NCHW again from its first conv on, silently."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for pipeline in ("channels-last, random, mask{sparsity=0.5}, fold",
                     "channels-last, random, mask{granularity=channel, sparsity=0.5}, shrink, "
                     "fold-bn"):
        graph = chop.run(chop.trace(_separable(), (x,)).eval(), pipeline)
        strides = _conv_strides(dict(graph.module.named_parameters()))
        assert len(strides) == 4 and all(s == cl for s, cl in strides.values()), (pipeline, strides)
        with torch.no_grad():
            assert graph(x)[0].numel() == 4
    graph = chop.run(chop.trace(_separable(), (x,)).eval(),
                     "random, mask{sparsity=0.5}, channels-last")
    chop.save(graph, tmp_path / "out", x)
    saved = torch.export.load(tmp_path / "out" / "model.pt2").state_dict
    strides = _conv_strides(saved)
    assert len(strides) == 4 and all(s == cl for s, cl in strides.values()), strides


def test_a_graph_without_convs_is_told_so_and_not_blamed_on_masks(mlp, mlp_batches, caplog):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(graph, "channels-last, snip, mask", data=mlp_batches)
    assert [m for m in caplog.messages if "changed nothing" in m] == [
        f"channels-last changed nothing: {graph.name} has no conv weight (it only changes the "
        "layout of convolutions); leave it out of the pipeline"]


def test_a_graph_of_1d_convolutions_is_told_so(caplog):
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 2, 1))
    graph = chop.trace(model, (torch.randn(2, 3, 8),))
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(graph, "channels-last")
    assert [m for m in caplog.messages if "changed nothing" in m] == [
        f"channels-last changed nothing: the convolutions of {graph.name} are 1-D, for which "
        "torch has no channels-last layout; leave it out of the pipeline"]


class WeightNorm(nn.Module):
    """A conv whose weight another op reads too, through a view (a per-filter norm)."""

    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

    def forward(self, x):
        norms = self.c.weight.view(8, -1).norm(dim=1)
        return self.c(x).mean((2, 3)) / norms + self.d(x).mean((2, 3))


def test_a_weight_another_op_views_keeps_its_layout():
    """Restrided, the weight's view failed at run time (without data) or as a bug in chop."""
    x = torch.randn(2, 3, 6, 6)
    model = WeightNorm().eval()
    graph = chop.run(chop.trace(model, (x,)), "channels-last", data=[(x, torch.tensor([0, 1]))])
    assert graph.history[-1].info["converted"] == ["d.weight"]
    assert graph.parameter("c.weight").is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(x), model(x))


def test_views_of_channels_last_results_become_reshapes():
    """A decomposed program spells nn.Flatten as aten.view, which cannot flatten the
    channels-last result the converted conv returns: the graph failed after the pass."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model.eval(), (x,)).run_decompositions()
    graph = chop.Graph(program.module(), training=False)
    views = [n for n in graph.module.graph.nodes if n.target is torch.ops.aten.view.default]
    assert views  # (else this tests nothing)
    chop.run(graph, "channels-last")  # no data: nothing would have caught it
    assert graph.history[-1].info["converted"] == ["0.weight"]
    assert not [n for n in graph.module.graph.nodes if n.target is torch.ops.aten.view.default]
    with torch.no_grad():
        torch.testing.assert_close(graph.module(x), model(x))


class ViewsInBlocks(nn.Module):
    """Views of a conv's result inside an autocast block and a no_grad buffer update, which
    export puts in submodules of higher-order ops."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 64, 3)
        self.register_buffer("stat", torch.zeros(8 * 64))

    def forward(self, x):
        y = self.c(x)
        with torch.no_grad():
            self.stat.copy_(y.view(y.shape[0], -1).mean(0))
        with torch.autocast("cpu", enabled=False):
            z = y.view(y.shape[0], -1)
        return self.fc(z) + self.stat.sum()


def test_views_inside_no_grad_and_autocast_blocks_become_reshapes_too():
    x = torch.randn(2, 3, 8, 8)
    model = ViewsInBlocks()
    graph = chop.trace(model, (x,))
    chop.run(graph, "channels-last", data=[(x, torch.tensor([0, 1]))])
    assert graph.history[-1].info["converted"] == ["c.weight"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(graph.eval()(x), model(x))
