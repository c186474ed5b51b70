"""Norm rules: BatchNorm's members and its exact eval-mode constant; GroupNorm per channel (one
channel per group) or blocked; layer_norm and softmax block the channels they normalise over
(still followed) and pass channels along other dims, with no constant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chop.ir.masks import insert_mask
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.flow.rules.norms import BatchNorm
from chop.passes.analysis.group_select import group_masks
from chop.passes.export.constants import channel_constants
from chop.passes.export.shrink import shrink
from zoo import traced_flow


def node(graph, name):
    return next(n for n in graph.module.graph.nodes if n.name == name)


def test_batch_norm_members_and_its_eval_constant_match_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    conv, bn = model[0], model[1]
    with torch.no_grad():
        conv.weight[2] = 0
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
    x = torch.randn(2, 3, 6, 6)
    graph, flow = traced_flow(model, x)
    atoms = flow.members["0.weight", 0].atoms.tolist()
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert flow.members[name, 0].role == "channel" and flow.members[name, 0].atoms.tolist() == atoms
    norm = next(n for n, step in flow.steps.items() if isinstance(step.rule, BatchNorm))
    value, known = channel_constants(graph, flow)[norm]
    assert known.tolist() == [False, False, True, False]
    expected = ((conv.bias[2] - bn.running_mean[2]) / torch.sqrt(bn.running_var[2] + bn.eps)
                * bn.weight[2] + bn.bias[2])
    torch.testing.assert_close(value[2], expected.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and that is what the model computes for every input
        torch.testing.assert_close(model[:2](x)[:, 2], expected.expand(2, 4, 4), rtol=1e-6, atol=1e-6)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):  # x: [batch, seq, 4]
        y = self.fc1(x)
        a = F.layer_norm(y, (6,))  # over the channels
        b = F.layer_norm(y.transpose(1, 2), (3,)).transpose(1, 2)  # over the sequence
        return self.fc2(a + b.softmax(1))


def test_layer_norm_over_the_channels_blocks_and_over_other_dims_passes_without_constant():
    model = Normed()
    with torch.no_grad():
        model.fc1.weight[0] = 0
    graph, flow = traced_flow(model, torch.randn(2, 3, 4))
    atoms = flow.members["fc1.weight", 0].atoms.tolist()
    (reason,) = {flow.blocked.get(a) for a in atoms}
    assert reason == ("layer_norm (aten.layer_norm.default): layer_norm normalises over these "
                      "channels: removing one changes the others")
    consts = channel_constants(graph, flow)
    assert consts[node(graph, "linear")][1][0]  # fc1's channel 0 is its bias...
    for name in ("layer_norm_1", "softmax"):  # ...and stays channel-wise, but not constant
        assert flow.tags[node(graph, name)].atoms.tolist() == atoms
        assert not consts[node(graph, name)][1].any()
    # blocked but still followed: the normalised tensor carries the same (blocked) channels
    assert flow.tags[node(graph, "layer_norm")].atoms.tolist() == atoms
    assert not consts[node(graph, "layer_norm")][1].any()


def test_softmax_over_the_channels_blocks():
    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x).softmax(-1))

    _, flow = traced_flow(Soft(), torch.randn(2, 4))
    (reason,) = {flow.blocked.get(a) for a in flow.members["fc1.weight", 0].atoms.tolist()}
    assert reason == ("softmax (aten.softmax.int): softmax normalises over these channels: "
                      "removing one changes the others")


class GroupNormed(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv1d(3, 4, 1), nn.GroupNorm(groups, 4), nn.Conv1d(4, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x)))).mean(-1)


def test_group_norm_with_one_channel_per_group_is_per_channel_and_shrinks():
    torch.manual_seed(0)
    model = GroupNormed(4).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 2)
        model.norm.bias.uniform_(-1, 1)
    graph, flow = traced_flow(model, torch.randn(2, 3, 5))
    groups = channel_groups(graph, flow)
    (group,) = groups.of("conv1.weight", "out")
    assert group.prunable.all() and {"norm.weight", "norm.bias"} <= set(group.layers("channel"))
    for name, mask in group_masks(graph, groups, {group.id: torch.tensor([True, False, True, False])}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    norm = next(n for n in graph.module.graph.nodes if n.target is torch.ops.aten.group_norm.default)
    assert norm.args[1] == 2 and graph.parameter("norm.weight").shape == (2,)


def test_group_norm_over_several_channels_blocks_them():
    _, flow = traced_flow(GroupNormed(2), torch.randn(2, 3, 5))
    (reason,) = {flow.blocked.get(a) for a in flow.members["conv1.weight", 0].atoms.tolist()}
    assert reason == ("group_norm (aten.group_norm.default): group_norm normalises over these "
                      "channels (several per group): removing one changes the others")
