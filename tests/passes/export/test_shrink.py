"""shrink: masked ↔ shrunk equivalence on the zoo (CNNs; squeeze-excitation, in-place
activations and stochastic depth; ConvNeXt; nn.MultiheadAttention after a class token; window
attention with a relative position bias; BERT, GPT-2), exact parameter counts, .pt2 round trip,
constants carried into the next bias (and kept where padding makes that inexact)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chop
from chop.cli.outputs import export_program
from chop.ir.masks import insert_mask, is_masked
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.group_select import group_masks
from chop.passes.export.shrink import shrink
from zoo import ZOO, output, prune_half, trace


def removed_of(groups, keep, name):
    """Channels removed from the group whose producers include weight ``name``."""
    (group,) = groups.of(name, "out")
    return int((~keep[group.id]).sum()) if group.id in keep else 0


def kept_of(groups, keep, name):
    (group,) = groups.of(name, "out")
    return group.size - removed_of(groups, keep, name)


# Parameter counts written from each architecture: k(name) = channels kept in the group that
# `name` produces (for grouped/merged units, units kept).
def vgg_params(k):
    c = [k("features.0.weight"), k("features.3.weight"), k("features.7.weight"), k("features.10.weight")]
    hidden = k("classifier.0.weight")
    convs = sum(cout * cin * 9 + cout + 2 * cout for cin, cout in zip([3] + c[:-1], c))
    return convs + hidden * c[3] * 16 + hidden + 10 * hidden + 10


def resnet_params(k):
    r, a1, a2, d = (k("stem.0.weight"), k("layer1.a.0.weight"), k("layer2.a.0.weight"),
                    k("layer2.b.0.weight"))
    conv_bn = lambda cin, cout, ks: cout * cin * ks * ks + 2 * cout  # noqa: E731
    return (conv_bn(3, r, 3) + conv_bn(r, a1, 3) + conv_bn(a1, r, 3) + conv_bn(r, a2, 3)
            + conv_bn(a2, d, 3) + conv_bn(r, d, 1) + d * 10 + 10)


def mobilenet_params(k):
    s, p, e, g = k("stem.0.weight"), 4 * k("pw1.0.weight"), k("expand.0.weight"), 4 * k("grouped.0.weight")
    return (3 * 9 * s + 2 * s + 9 * s + 2 * s + s * p + 2 * p + p * e + 2 * e + 9 * e + 2 * e
            + e * p + 2 * p + g * (p // 4) + 2 * g + 10 * g + 10)


def inception_params(k):
    s, b1, b3, bp = k("stem.weight"), k("b1.weight"), k("b3.weight"), k("bp.weight")
    (mix_a, mix_b), side = k("mix.weight"), k("side.weight")
    return (27 * s + s + s * b1 + b1 + 9 * s * b3 + b3 + s * bp + bp
            + (b1 + b3 + bp) * (mix_a + mix_b) + mix_a + mix_b + mix_b * side + side
            + 10 * (mix_a + side) + 10)


def mlp_params(k):
    a, b = k("fc1.weight"), k("fc2.weight")
    return 64 * a + a + a * b + b + 10 * b + 10


def mobilenetv3_params(k):
    s, e, q, h = k("stem.0.weight"), k("expand.0.weight"), k("se.fc1.weight"), k("head.0.weight")
    return (27 * s + 2 * s + s * e + 2 * e + 9 * e + 2 * e + e * q + q + q * e + e + e * s + 2 * s
            + s * h + h + h * 10 + 10)


def efficientnet_params(k):
    s, e, q = k("stem.0.weight"), k("expand.0.weight"), k("se.fc1.weight")
    return (27 * s + 2 * s + s * e + 2 * e + 9 * e + 2 * e + e * q + q + q * e + e + e * s + 2 * s
            + 10 * s + 10)


def convnext_params(k):
    hidden = k("fc1.weight")  # the stream (16) is LayerNorm'd: it stays
    return 3 * 16 * 16 + 16 + 16 * 49 + 16 + 32 + 16 * hidden + hidden + hidden * 16 + 16 + 16 + 170


def vit_params(k):
    total = 3 * 16 * 32 + 32 + 32 + 17 * 32 + 64 + 330  # patch, class token, positions, norm, head
    for b in range(2):
        h, m = k(f"blocks.{b}.attn.in_proj_weight"), k(f"blocks.{b}.fc1.weight")
        total += 64 + 24 * h * 32 + 24 * h + 32 * 8 * h + 32 + 64 + 32 * m + m + 32 * m + 32
    return total


def swin_params(k):
    c, h, m = k("embed.weight"), k("qkv.weight"), k("fc1.weight")  # head_dim 4, 7×7 offsets
    return (12 * c + c + 12 * h * c + 12 * h + c * 4 * h + c + 49 * h + m * c + m + c * m + c
            + 10 * c + 10)


def transformer_params(dense, heads_removed, ffn_removed, pooler_removed=0, hidden=32, head_dim=8):
    per_head = 3 * (hidden * head_dim + head_dim) + head_dim * hidden  # q, k, v rows; out columns
    per_ffn = hidden + 1 + hidden
    return dense - per_head * heads_removed - per_ffn * ffn_removed - (hidden + 1 + 3) * pooler_removed


def expected_params(name, model, groups, keep):
    k = lambda layer: kept_of(groups, keep, layer)  # noqa: E731
    if name == "inception":
        halves = groups.of("mix.weight", "out")
        k = lambda layer: ([h.size - int((~keep[h.id]).sum()) for h in halves]  # noqa: E731
                           if layer == "mix.weight" else kept_of(groups, keep, layer))
    if name in ("bert", "gpt2"):
        dense = sum(p.numel() for p in model.parameters())
        heads = sum(int((~keep[g.id]).sum()) for g in groups if g.kind == "head" and g.id in keep)
        ffn_layers = ("intermediate.dense.weight", "mlp.c_fc.weight")
        ffn = sum(int((~keep[g.id]).sum()) for g in groups if g.id in keep
                  and any(n.endswith(ffn_layers) for n in g.layers("out")))
        pooler = removed_of(groups, keep, "bert.pooler.dense.weight") if name == "bert" else 0
        return transformer_params(dense, heads, ffn, pooler)
    return {"vgg": vgg_params, "resnet": resnet_params, "mobilenet": mobilenet_params,
            "inception": inception_params, "mlp": mlp_params, "mobilenetv3": mobilenetv3_params,
            "efficientnet": efficientnet_params, "convnext": convnext_params, "vit": vit_params,
            "swin": swin_params}[name](k)


def masked(name):
    """Zoo model ``name`` traced, with the lowest-scoring half of every group masked out."""
    model, graph = trace(name)
    groups = channel_groups(graph)
    keep = prune_half(graph, groups)
    for param, mask in group_masks(graph, groups, keep).items():
        insert_mask(graph, graph.weight_node(param), mask)
    graph.recompile()
    return model, graph, groups, keep


def new_inputs(name):
    args, kwargs = ZOO[name].inputs(5)
    if kwargs:  # a new sequence length as well
        args, kwargs = (), {k: torch.cat([v, v[:, :3]], 1) for k, v in kwargs.items()}
    return args, kwargs


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenet", "inception", "mlp", "bert", "gpt2",
                                  "mobilenetv3", "efficientnet", "convnext", "vit", "swin"])
def test_shrunk_equals_masked_with_exact_parameter_counts_and_pt2_round_trip(name, tmp_path):
    model, graph, groups, keep = masked(name)
    assert keep and any((~k).any() for k in keep.values())
    args, kwargs = new_inputs(name)
    with torch.no_grad():
        expected = output(graph(*args, **kwargs))
    chop.run(graph, "shrink")
    with torch.no_grad():
        got = output(graph(*args, **kwargs))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    params = sum(p.numel() for p in graph.module.parameters())
    assert params == expected_params(name, model, groups, keep)
    info = graph.history[-1].info
    assert info["total"]["params"] == (sum(p.numel() for p in model.parameters()), params)
    assert info["removed"] == {gid: int((~k).sum()) for gid, k in keep.items() if (~k).any()}
    for stats in info["layers"].values():
        assert stats["params"][1] <= stats["params"][0] and stats["flops"][1] <= stats["flops"][0]
    assert info["total"]["flops"][1] < info["total"]["flops"][0]

    example = ZOO[name].inputs(3)
    program = export_program(graph, example[1] if example[1] else example[0])
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(output(loaded(*args, **kwargs)), got)


def test_vgg_flops_and_params_per_layer():
    _, graph, groups, keep = masked("vgg")
    report = shrink(graph)
    c0, c1 = kept_of(groups, keep, "features.0.weight"), kept_of(groups, keep, "features.3.weight")
    assert report["layers"]["features.3.weight"]["params"] == (16 * 16 * 9 + 16, c1 * c0 * 9 + c1)
    assert report["layers"]["features.3.weight"]["flops"] == (2 * 16 * 16 * 9 * 256, 2 * c1 * c0 * 9 * 256)


def producer_only_masks(graph, groups):
    """Zero the producer rows of every other prunable channel, leaving readers' columns alone:
    removed channels then output act(bn(bias)), a constant the next layer must absorb."""
    masks = {}
    for g in groups:
        for m in g.members:
            if m.role == "out" and m.name.endswith("weight"):
                mask = masks.setdefault(m.name, torch.ones_like(graph.parameter(m.name), dtype=torch.bool))
                for u in range(0, g.size, 2):
                    if g.prunable[u]:
                        mask.index_fill_(m.dim, m.index[u], False)
    for name, mask in masks.items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()


def test_constants_of_removed_channels_go_into_the_next_bias_except_behind_padding():
    model, graph = trace("vgg")
    groups = channel_groups(graph)
    producer_only_masks(graph, groups)
    args, _ = new_inputs("vgg")
    with torch.no_grad():
        expected = graph(*args)
    bias_before = graph.parameter("classifier.0.bias").detach().clone()
    report = shrink(graph)
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected, rtol=1e-4, atol=1e-5)
    sizes = {name: tuple(p.shape) for name, p in graph.module.named_parameters()}
    # channels read by padded 3×3 convs stay; the last conv feeds a linear through flatten: goes
    assert sizes["features.0.weight"][0] == 16 and sizes["features.3.weight"][0] == 16
    assert sizes["features.7.weight"][0] == 32 and sizes["features.10.weight"][0] == 16
    assert sizes["classifier.0.weight"] == (32, 16 * 16) and sizes["classifier.3.weight"] == (10, 32)
    assert not torch.allclose(graph.parameter("classifier.3.bias"), model.classifier[3].bias)
    assert report["removed"] == {groups.of("features.10.weight", "out")[0].id: 16,
                                 groups.of("classifier.0.weight", "out")[0].id: 32}
    assert bias_before.shape != graph.parameter("classifier.0.bias").shape


@pytest.mark.parametrize("name", ["mobilenet", "mlp"])
def test_constants_into_unpadded_convs_and_linears(name):
    _, graph = trace(name)
    groups = channel_groups(graph)
    producer_only_masks(graph, groups)
    args, _ = new_inputs(name)
    with torch.no_grad():
        expected = graph(*args)
    report = shrink(graph)
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected, rtol=1e-4, atol=1e-5)
    assert report["total"]["params"][1] < report["total"]["params"][0]
    if name == "mobilenet":  # pw1 feeds 1×1 convs only: half its units go, bias absorbs them
        assert graph.parameter("pw1.0.weight").shape[0] == 12


def test_a_constant_channel_into_a_layer_applied_at_two_sites_stays():
    """A head shared by two feature maps (RetinaNet/FPN, ALBERT's shared layer) has one bias
    for both sites: a constant input channel cannot go into it, whatever its value at each;
    a channel the head does not read still goes."""

    class SharedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            a, b = torch.relu(self.l1(x)), torch.relu(self.l2(x[:, :, ::2, ::2]))
            return self.head(a).mean((2, 3)) + self.head(b).mean((2, 3))

    torch.manual_seed(0)
    model = SharedHead().eval()
    with torch.no_grad():
        for conv, value in ((model.l1, 1.0), (model.l2, 2.0)):  # channel 0: relu(bias) there
            conv.weight[0], conv.bias[0] = 0, value
        model.head.weight[:, 5] = 0  # channel 5: read by nothing
    graph = chop.trace(model, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("head.weight").shape == (4, 7, 1, 1)  # 5 went, 0 stayed
    assert graph.parameter("l1.weight").shape[0] == graph.parameter("l2.weight").shape[0] == 7


def test_without_compensation_channels_with_constant_readers_stay():
    _, graph = trace("mlp")
    producer_only_masks(graph, channel_groups(graph))
    report = shrink(graph, compensate=False)
    assert report["removed"] == {} and report["total"]["params"][0] == report["total"]["params"][1]


def test_unprunable_channels_stay_and_shrinking_twice_changes_nothing():
    _, graph = trace("opaque")
    groups = channel_groups(graph)
    keep = {groups.of("conv1.weight", "out")[0].id: torch.arange(8) % 2 == 0}
    masks = group_masks(graph, groups, keep)
    masks["conv2.weight"][:4] = False  # conv2's channels meet cumsum over channels: they stay
    for name, mask in masks.items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    args, _ = new_inputs("opaque")
    with torch.no_grad():
        expected = graph(*args)
    chop.run(graph, "shrink")
    assert graph.parameter("conv2.weight").shape == (8, 4, 1, 1)
    assert graph.parameter("conv1.weight").shape == (4, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected)
    chop.run(graph, "shrink")
    assert not graph.history[-1].modified


def test_a_tensor_is_never_emptied():
    _, graph = trace("opaque")
    node = graph.weight_node("conv2.weight")  # nothing reads conv1's channels any more
    insert_mask(graph, node, torch.zeros_like(graph.parameter(node), dtype=torch.bool))
    graph.recompile()
    args, _ = new_inputs("opaque")
    with torch.no_grad():
        expected = graph(*args)
    shrink(graph)
    assert graph.parameter("conv1.weight").shape[0] == 1
    assert graph.parameter("conv2.weight").shape == (8, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected)


def test_shrink_pass_checks_and_times_itself_with_data():
    _, graph = trace("vgg")
    args, _ = ZOO["vgg"].inputs(4)
    chop.run(graph, "random{seed=2}, mask{granularity=channel, sparsity=0.5, scope=local}")
    chop.run(graph, "shrink{timing=true}", data=[(args[0], torch.zeros(4, dtype=torch.long))])
    total = graph.history[-1].info["total"]
    before, after = total["params"]
    assert after < before
    assert len(total["model_latency_us"]) == 2 and min(total["model_latency_us"]) > 0
    assert 0 < total["check_s"] < graph.history[-1].seconds  # the check is part of its time
    _, unchecked = trace("vgg")
    chop.run(unchecked, "random{seed=2}, mask{granularity=channel, sparsity=0.5}, shrink")
    assert "check_s" not in unchecked.history[-1].info["total"]  # no data: nothing checked


def wide_mlp() -> tuple[nn.Module, tuple]:
    """Few nodes, 4.3M linear weight entries: far more per node than a recompile costs (tanh:
    no unit is dead on the check's samples, so a wrong cut always shows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 2048), nn.Tanh(), nn.Linear(2048, 2048), nn.Tanh(),
                         nn.Linear(2048, 10)), (torch.randn(4, 64),)


@pytest.mark.parametrize(("name", "folded_first"), [("wide", True), ("bert", False),
                                                   ("vgg", False), ("resnet", False)])
def test_shrink_checks_against_the_folded_graph_when_linear_masks_dominate(
        name, folded_first, monkeypatch):
    from chop.passes.analysis.flow.rule import Cut
    from chop.passes.export import shrink as shrink_module

    if name == "wide":
        model, args = wide_mlp()
        graph, kwargs = chop.trace(model, args), None
    else:
        _, graph = trace(name)
        args, kwargs = ZOO[name].inputs(4)
    data = [(kwargs or args[0], torch.zeros(4, dtype=torch.long))]
    chop.run(graph, "random{seed=2}, mask{granularity=channel, sparsity=0.5, scope=local}")
    masked = []  # per forward of the module: were masks still multiplied in?
    graph.module.register_forward_pre_hook(lambda m, a: masked.append(is_masked(graph)))

    class Wrong(Cut):  # one more channel of every cut tensor goes than the masks removed
        def gone(self, node):
            gone = super().gone(node).clone()
            if gone.any() and not gone.all():
                gone[(~gone).nonzero()[0]] = True
            return gone

    monkeypatch.setattr(shrink_module, "Cut", Wrong)
    with pytest.raises(chop.InternalError, match="the shrunk graph|shape .* is invalid"):
        chop.run(graph, "shrink", data=data)  # a wrong output, or a view the cut broke
    # the reference forward ran on folded weights where linear layers hold most masked entries
    # and more per graph node than a recompile costs (a tiny BERT, the VGG's classifier: fewer;
    # a ResNet: mostly conv entries), else masked
    assert masked == [not folded_first, False]


class InPlace(torch.nn.Module):
    """In-place activations and an in-place residual add (EfficientNet/MobileNetV3 style)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.fc = torch.nn.Conv2d(8, 8, 1), torch.nn.Linear(8, 10)

    def forward(self, x):
        x = torch.nn.functional.hardswish(self.bn1(self.conv1(x)), inplace=True)
        y = self.conv2(x)
        y.add_(x)
        torch.nn.functional.silu(y, inplace=True)
        return self.fc(y.mean((2, 3)))


def test_in_place_ops_shrink_like_their_out_of_place_ops():
    torch.manual_seed(0)
    model = InPlace().eval()
    graph = chop.trace(model, ZOO["vgg"].inputs(2)[0])
    groups = channel_groups(graph)
    (group,) = groups.of("conv1.weight", "out")
    assert set(group.layers("out")) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    assert group.prunable.all()
    for name, mask in group_masks(graph, groups, {group.id: torch.arange(8) % 2 == 0}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    args, _ = new_inputs("vgg")
    with torch.no_grad():
        expected = graph(*args)
    shrink(graph)
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in graph.module.parameters()) == (
        4 * 3 * 9 + 4 + 2 * 4) + (4 * 4 + 4) + (10 * 4 + 10)


def test_a_shrink_that_fails_leaves_the_folded_graph_runnable(monkeypatch):
    import chop.passes.export.shrink as shrink_module

    _, graph = trace("vgg")
    chop.run(graph, "random{seed=2}, mask{granularity=channel, sparsity=0.5}")
    args, _ = new_inputs("vgg")
    with torch.no_grad():
        expected = graph(*args)

    def broken(*a, **k):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(shrink_module, "_decide", broken)
    with pytest.raises(RuntimeError, match="broken on purpose"):
        shrink(graph)
    assert not is_masked(graph)  # the masks were folded before the error
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected)  # the code reads the folded weights


class SharedLayers(nn.Module):
    """A square linear applied twice to the model input (``l(relu(l(x)))``), and a conv applied
    both to the model input and to another conv's channels."""

    def __init__(self):
        super().__init__()
        self.l, self.f, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(14, 4)
        self.a, self.c = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.d = nn.Conv2d(6, 6, 1)

    def forward(self, x, img):
        h = torch.relu(self.f(torch.relu(self.l(torch.relu(self.l(x))))))
        y = torch.relu(self.c(torch.relu(self.a(img))) + self.c(img))
        return self.head(torch.cat([h, torch.relu(self.d(y)).mean((2, 3))], 1))


def test_a_layer_applied_twice_shrinks_only_what_every_use_can_lose():
    torch.manual_seed(0)
    args = (torch.randn(2, 8), torch.randn(2, 3, 8, 8))
    graph = chop.trace(SharedLayers().eval(), args)
    chop.run(graph, "random{seed=0}, mask{granularity=channel, sparsity=0.5}")
    with torch.no_grad():
        expected = graph(*args)
    shrink(graph)
    with torch.no_grad():
        torch.testing.assert_close(graph(*args), expected)
    names = ("l.weight", "f.weight", "head.weight", "a.weight", "c.weight", "d.weight")
    shapes = {name: tuple(graph.parameter(name).shape) for name in names}
    # l reads x, and a's channels meet img's at c: those stay whole; f's, c's and d's outputs
    # lose the channels the mask chose (and head and d the matching inputs)
    assert shapes == {"l.weight": (8, 8), "f.weight": (4, 8), "head.weight": (4, 7),
                      "a.weight": (3, 3, 3, 3), "c.weight": (4, 3, 1, 1), "d.weight": (3, 4, 1, 1)}
