"""Elementwise rules: a residual add joins atoms position by position, an untracked operand may
only broadcast along the channels (a parameter per channel is a member; a table along one dim of
a split layout keeps that dim whole), and a constant is computed with the op."""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

from chop.ir.masks import insert_mask
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.group_select import group_masks
from chop.passes.export.constants import channel_constants
from chop.passes.export.shrink import shrink
from zoo import traced_flow


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)
        self.pos = nn.Parameter(torch.randn(1, 1, 4, 4))  # broadcast along the channels

    def forward(self, x):
        y = torch.sigmoid(self.conv1(x))
        z = self.conv2(y) + y + self.pos
        return self.conv3(z).mean((2, 3))


def node(graph, name):
    return next(n for n in graph.module.graph.nodes if n.name == name)


def test_a_residual_add_joins_the_atoms_meeting_at_each_position():
    _, flow = traced_flow(Residual(), torch.randn(2, 3, 4, 4))
    a, b = flow.members["conv1.weight", 0].atoms.tolist(), flow.members["conv2.weight", 0].atoms.tolist()
    for i in range(4):
        unit = nx.node_connected_component(flow.coupling, a[i])
        assert unit == {a[i], b[i]}
    assert flow.members["conv3.weight", 1].atoms.tolist() == b  # the add carries its first operand's
    assert not any(x in flow.blocked for x in a + b)


def test_an_untracked_operand_that_varies_along_the_channels_blocks():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc((self.conv(x) + x).mean((2, 3)))

    _, flow = traced_flow(Skip(), torch.randn(2, 3, 4, 4))
    (reason,) = {flow.blocked.get(a) for a in flow.members["conv.weight", 0].atoms.tolist()}
    assert reason.startswith("add (aten.add.Tensor): combines these channels with x, whose "
                             "channels are not tracked")


def test_a_constant_is_computed_with_the_op_and_known_only_where_every_operand_is():
    model = Residual()
    with torch.no_grad():
        model.conv1.weight[1] = 0  # channel 1 of conv1 is bias[1] everywhere
        model.conv2.weight[[1, 2]] = 0
    graph, flow = traced_flow(model, torch.randn(2, 3, 4, 4))
    consts = channel_constants(graph, flow)
    value, known = consts[node(graph, "sigmoid")]
    assert known.tolist() == [False, True, False, False]
    assert value[1] == torch.sigmoid(model.conv1.bias[1])
    value, known = consts[node(graph, "add")]  # conv2(y) + y
    assert known.tolist() == [False, True, False, False]
    assert value[1] == model.conv2.bias[1] + torch.sigmoid(model.conv1.bias[1])
    _, known = consts[node(graph, "add_1")]  # + pos, which varies: unknown
    assert not known.any()


def test_an_in_place_op_leaves_the_constant_its_earlier_readers_see():
    class Early(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv1(x)
            a = self.conv2(y)  # reads y before the in-place relu
            y.relu_()
            return a + self.conv3(y)

    model = Early()
    with torch.no_grad():
        model.conv1.weight[0] = 0
        model.conv1.bias[0] = -1.0
    graph, flow = traced_flow(model, torch.randn(2, 3, 4, 4))
    consts = channel_constants(graph, flow)
    readers = {c.weight: c.input.name for c in flow.consumers}
    assert readers == {"conv2.weight": "conv2d", "conv3.weight": "relu_"}
    assert consts[node(graph, "conv2d")][0][0] == -1.0 and consts[node(graph, "relu_")][0][0] == 0.0


class Scaled(nn.Module):
    """A layer scale (a parameter per channel) and a table varying along one dim of a split
    channel layout while broadcast along the other."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.scale = nn.Parameter(torch.rand(8))
        self.register_buffer("table", torch.rand(4, 1))

    def forward(self, x):
        y = self.scale * self.fc1(x)  # [b, 8]
        z = (self.fc2(y).view(-1, 4, 2) * self.table).flatten(1)  # table varies along dim 1
        return self.fc3(z)


def test_a_parameter_per_channel_is_a_member_and_a_table_keeps_its_dim_whole():
    graph, flow = traced_flow(Scaled(), torch.randn(2, 4))
    scale = flow.members["scale", 0]
    assert scale.role == "channel" and scale.atoms.tolist() == flow.members["fc1.weight", 0].atoms.tolist()
    assert not any(a in flow.blocked for a in scale.atoms.tolist())
    rows = flow.members["fc2.weight", 0].atoms.view(4, 2)  # output channel 2i + j sits at (i, j)
    for j in range(2):  # positions along the table's dim go together: units are the columns j
        assert nx.node_connected_component(flow.coupling, int(rows[0, j])) == set(rows[:, j].tolist())
    groups = channel_groups(graph, flow)
    (group,) = groups.of("fc2.weight", "out")
    assert group.size == 2 and group.prunable.all()
    keep = {groups.of("fc1.weight", "out")[0].id: torch.arange(8) % 3 != 0, group.id: torch.tensor([True, False])}
    for name, mask in group_masks(graph, groups, keep).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("scale").shape == (5,) and graph.parameter("fc2.weight").shape == (4, 5)


def test_clamp_bounds_per_channel_are_members_and_shrink_with_the_channels():
    class Capped(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.fc = nn.Linear(6, 8), nn.Linear(8, 3)
            self.floor = nn.Parameter(torch.full((8,), -0.5))
            self.register_buffer("cap", torch.rand(8) + 0.5)

        def forward(self, x):
            h = torch.clamp(torch.relu(self.l1(x)), max=self.cap)
            return self.fc(torch.clamp(h, min=self.floor).clamp(max=2.0) + torch.clamp_max(h, 1.0))

    torch.manual_seed(0)
    model = Capped().eval()
    with torch.no_grad():
        model.fc.weight[:, :3] = 0  # channels 0-2 read by nothing
    graph, flow = traced_flow(model, torch.randn(5, 6))
    assert set(flow.members) >= {("cap", 0), ("floor", 0)}
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.module.cap.shape == (5,) and graph.parameter("floor").shape == (5,)
    assert graph.parameter("l1.weight").shape == (5, 6)
