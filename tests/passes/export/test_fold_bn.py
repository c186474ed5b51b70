"""fold-bn: eval-mode BatchNorm folded into the conv/linear before it, only where that is exact."""

from __future__ import annotations

import copy
import io
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chop
from chop.cli.outputs import export_program
from chop.passes.export import fold_bn

aten = torch.ops.aten


def randomise_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding them matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.3, 2.0)
                if module.affine:
                    module.weight.normal_(1, 0.3)
                    module.bias.normal_(0, 0.3)
    return model.eval()


def batch_norms(graph: chop.Graph) -> list:
    return [n for n in graph.module.graph.nodes if n.target in fold_bn._BATCH_NORMS]


def n_params(graph: chop.Graph) -> int:
    return sum(p.numel() for p in graph.module.parameters())


def folded(model: nn.Module, x: torch.Tensor, data: bool = True) -> tuple[chop.Graph, torch.Tensor]:
    """The graph of ``model`` after fold-bn (outputs checked by the pass), and the eval output
    before folding on ``x``."""
    graph = chop.trace(randomise_statistics(model), (x[:2],)).eval()
    with torch.no_grad():
        before = graph(x)
    chop.run(graph, "fold-bn", data=[(x, torch.zeros(len(x), dtype=torch.long))] if data else None)
    return graph, before


class ConvBn(nn.Module):
    def __init__(self, bias: bool = True, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6, affine=affine)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (True, False), (False, False)])
def test_conv_bn_folds_exactly(bias, affine):
    model = ConvBn(bias, affine)
    x = torch.randn(4, 3, 8, 8)
    conv_w = model.conv.weight.detach().clone()
    graph, before = folded(model, x)
    assert batch_norms(graph) == []
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)
    bn = model.bn
    scale = (bn.weight.detach() if affine else 1) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(graph.parameter("conv.weight"), conv_w * scale.view(-1, 1, 1, 1))
    state = graph.module.state_dict()
    assert not any(k.startswith("bn.") for k in state)  # parameters, statistics and counter gone
    bias_name = [k for k in state if k.startswith("conv.bias")]
    assert len(bias_name) == 1  # a conv without bias got one
    expected_bias = ((model.conv.bias.detach() if bias else 0) - bn.running_mean) * scale
    expected_bias = expected_bias + (bn.bias.detach() if affine else 0)
    torch.testing.assert_close(state[bias_name[0]], expected_bias)
    assert n_params(graph) == 6 * 3 * 9 + 6  # conv weight and one bias, nothing else
    info = graph.history[-1].info
    assert info["folded"] == 1 and info["batch_norms"] == {"bn": {"into": "conv.weight", "op": "conv2d"}}
    assert info["params"] == [6 * 3 * 9 + 6 * bias + 12 * affine, 6 * 3 * 9 + 6]
    assert graph.history[-1].reshaped  # BatchNorm keys leave the state dict


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_folds_pass_the_output_check(dtype):
    # the folded conv rounds differently from conv then BatchNorm by about one epsilon of the
    # dtype (bfloat16: 2.9e-3 of the output's scale here), which the check accepts
    torch.manual_seed(0)
    model = randomise_statistics(ConvBn(bias=False))
    x = torch.randn(4, 3, 8, 8).to(dtype)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    model.to(dtype)
    graph = chop.trace(model, (x,)).eval()
    chop.run(graph, "fold-bn", data=[(x, torch.zeros(4, dtype=torch.long))])
    assert graph.history[-1].info["folded"] == 1 and not batch_norms(graph)
    with torch.no_grad():
        error = (graph(x).double() - reference).abs().max() / reference.abs().max()
    assert error < 4 * torch.finfo(dtype).eps


def test_linear_bn1d_folds_and_the_traced_model_is_left_alone():
    model = nn.Sequential(nn.Linear(10, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(5, 10)
    randomise_statistics(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    graph, before = folded(model, x)
    assert batch_norms(graph) == []
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)
    assert n_params(graph) == 10 * 7 + 7 + 7 * 3 + 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


class Branch(nn.Module):
    """conv1's output feeds its BatchNorm and a residual add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn2(self.conv2(F.relu(self.bn1(y)))) + y


def test_a_conv_whose_output_also_feeds_something_else_is_not_folded():
    x = torch.randn(3, 4, 6, 6)
    graph, before = folded(Branch(), x)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)
    rows = graph.history[-1].info["batch_norms"]
    assert rows["bn2"] == {"into": "conv2.weight", "op": "conv2d"}
    assert rows["bn1"]["reason"].startswith("the output of conv2d also feeds add")
    assert [n.args[1].target for n in batch_norms(graph)] == ["bn1.weight"]
    assert n_params(graph) == (4 * 4 * 9 + 4) + 8 + (4 * 4 + 4)


class Unfoldable(nn.Module):
    """BatchNorms that must stay: no running statistics; a linear's 3-D output (BatchNorm1d
    normalises dim 1, not the features); a shared conv weight; an input BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stats = nn.BatchNorm2d(3, track_running_stats=False)
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.seq = nn.Linear(4, 4)
        self.bn_seq = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.bn_a(self.shared(self.stats(x))) + self.bn_b(self.shared(x))
        return self.bn_seq(self.seq(y.mean(-1)))  # (N, 3, 4): channels are dim 1


def test_batch_norms_that_cannot_fold_are_reported_and_kept(caplog):
    x = torch.randn(3, 3, 4, 4)
    with caplog.at_level("WARNING", logger="chop"):
        graph, before = folded(Unfoldable(), x)
    said = [m for m in caplog.messages if m.startswith("fold-bn:")]
    assert len(said) == 1 and said[0].startswith(
        "fold-bn: 4 of 4 BatchNorm(s) not folded, they stay in the graph: ")
    assert said[0].endswith("; … (1 more in the pass's info)")
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)
    rows = graph.history[-1].info["batch_norms"]
    assert graph.history[-1].info["folded"] == 0 and not graph.history[-1].modified
    assert len(batch_norms(graph)) == 4
    reasons = sorted(r["reason"] for r in rows.values())
    assert any("no running statistics" in r for r in reasons)
    assert any("does not have a 2-D output" in r for r in reasons)
    assert sum("not a parameter of its own" in r for r in reasons) == 2  # the shared conv, twice
    assert len(reasons) == 4


def test_masks_are_folded_first_and_stay_true(cnn, cnn_batches):
    """A weight's mask stays true (its rows are scaled); a folded bias's does not ((b − μ)·γ/σ
    + β is nonzero where b was pruned), so it is dropped: its mask said pruned, its values
    were not zero."""
    randomise_statistics(cnn)
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    chop.run(graph, "magnitude, mask{sparsity=0.7, biases=true}")
    assert {"conv1.bias", "conv2.bias"} <= set(graph.history[-1].info["kept"])
    graph.eval()
    x = cnn_batches[1][0]
    with torch.no_grad():
        masked = graph(x)
    chop.run(graph, "fold-bn", data=cnn_batches)
    assert not any(k.endswith("_mask") for k in graph.module.state_dict())
    for name in ("conv1.weight", "conv2.weight"):
        node = graph.weight_node(name)
        mask = node.meta["chop"]["mask"]  # preserved: the pruned entries are still zero
        assert "saliency" not in node.meta["chop"]  # dropped: it described the unfolded weights
        assert not graph.parameter(name)[~mask].any() and graph.parameter(name)[mask].all()
    for name in ("conv1.bias", "conv2.bias"):
        assert "mask" not in graph.weight_node(name).meta["chop"]
        assert graph.parameter(name).all()
    with torch.no_grad():
        torch.testing.assert_close(graph(x), masked)


def test_after_folding_train_mode_no_longer_uses_batch_statistics():
    """The folded graph is an inference graph: train() cannot bring BatchNorm back."""
    x = torch.randn(6, 3, 8, 8)
    graph, before = folded(ConvBn(), x)
    graph.train()
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)  # the eval function, even in train mode
    original = chop.trace(randomise_statistics(ConvBn()), (x[:2],)).train()
    with torch.no_grad():
        assert not torch.allclose(original(x), before)  # what train mode meant before folding


def test_zoo_resnet_folds_every_batch_norm_and_reexports():
    import zoo

    _, graph = zoo.trace("resnet")
    args, _ = zoo.ZOO["resnet"].inputs(5)
    with torch.no_grad():
        before = graph(*args)
    params = n_params(graph)
    chop.run(graph, "fold-bn", data=[(args[0], torch.zeros(5, dtype=torch.long))])
    assert batch_norms(graph) == []
    channels = 16 + 16 + 16 + 32 + 32 + 32  # stem, layer1.a/b, layer2.a/b/short: bias-less convs
    assert n_params(graph) == params - 2 * channels + channels  # γ, β out; one bias in
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), before)
    buffer = io.BytesIO()
    torch.export.save(export_program(graph, args[0]), buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.export.load(buffer).module()(*args), before)


@pytest.mark.parametrize("statistics_used", [False, True])
def test_native_batch_norm_no_training_is_folded_unless_its_statistics_are_used(statistics_used):
    x = torch.randn(4, 3, 8, 8)
    graph = chop.trace(randomise_statistics(ConvBn()), (x[:2],)).eval()
    with torch.no_grad():
        before = graph(x)
    g = graph.module.graph
    (bn,) = batch_norms(graph)
    inputs, eps = bn.args[:5], bn.args[7]
    with g.inserting_before(bn):
        native = g.call_function(aten._native_batch_norm_legit_no_training.default,
                                 (*inputs, 0.1, eps))
        out = g.call_function(operator.getitem, (native, 0))
        if statistics_used:  # out + 0 * sum(saved mean): the same value, another reader
            saved = g.call_function(operator.getitem, (native, 1))
            zero = g.call_function(aten.mul.Tensor, (g.call_function(aten.sum.default, (saved,)), 0))
            out = g.call_function(aten.add.Tensor, (out, zero))
    bn.replace_all_uses_with(out)
    bn.meta.pop("chop_mode")
    g.erase_node(bn)
    graph.recompile()
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)
    chop.run(graph, "fold-bn")
    info = graph.history[-1].info
    if statistics_used:
        assert info["folded"] == 0 and len(batch_norms(graph)) == 1
        assert info["batch_norms"]["bn"] == {"reason": "its batch statistics outputs are used"}
    else:
        assert info["folded"] == 1 and batch_norms(graph) == []
        assert not any(n.target is operator.getitem for n in g.nodes)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)


def test_a_wrong_fold_is_caught_by_the_output_check(monkeypatch):
    def no_scaling(graph, bn, producer):  # removes the BatchNorm without folding it
        bn.replace_all_uses_with(producer)
        graph.module.graph.erase_node(bn)

    monkeypatch.setattr(fold_bn, "_fold", no_scaling)
    with pytest.raises(chop.InternalError, match="fold-bn graph does not reproduce"):
        folded(ConvBn(), torch.randn(4, 3, 8, 8))


class TwiceAndTransposed(nn.Module):
    """One BatchNorm module after two convs, and a BatchNorm after a transposed conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.up, self.bn_up = nn.ConvTranspose2d(4, 2, 2, stride=2), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.bn(self.c1(x)) + self.bn(self.c2(x))
        return self.bn_up(self.up(y))


def test_a_batch_norm_called_twice_is_reported_per_call_and_transposed_convs_are_named(caplog):
    x = torch.randn(3, 3, 4, 4)
    with caplog.at_level("WARNING", logger="chop"):
        graph, before = folded(TwiceAndTransposed(), x)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), before)
    info = graph.history[-1].info
    assert info["folded"] == 2 and len(batch_norms(graph)) == 1
    rows = info["batch_norms"]
    assert sorted(r["into"] for r in rows.values() if "into" in r) == ["c1.weight", "c2.weight"]
    assert len(rows) == 3 and "bn" in rows
    assert rows["bn_up"] == {"reason": "conv_transpose2d is a transposed convolution"}
    assert [m for m in caplog.messages if m.startswith("fold-bn:")] == [
        "fold-bn: 1 of 3 BatchNorm(s) not folded, they stay in the graph: bn_up (conv_transpose2d "
        "is a transposed convolution)"]
