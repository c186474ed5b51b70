"""Shape rules: a view into (heads, head_dim) makes each head one unit; transposes, slices and
expands move channel dims; and each rewrites the sizes it spells out when channels go."""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

from chop.ir.masks import insert_mask
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.flow.rule import Cut
from chop.passes.analysis.group_select import group_masks
from chop.passes.export.shrink import shrink
from zoo import traced_flow


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 2)
        self.conv, self.fc3 = nn.Conv2d(3, 6, 1), nn.Linear(4, 2)

    def forward(self, x, image):
        b, n, _ = x.shape
        y = self.fc1(x).view(b, n, 2, 4).transpose(1, 2)  # [b, heads, n, head_dim]
        y = torch.relu(y).transpose(1, 2).reshape(b, n, 8)
        z = self.conv(image)
        g = z.mean((2, 3), keepdim=True).expand(-1, 6, 4, 4)
        return self.fc2(y), self.fc3((z * g)[:, 1:5].permute(0, 2, 3, 1))


def traced():
    graph, flow = traced_flow(Shapes(), torch.randn(2, 5, 8), torch.randn(2, 3, 4, 4))
    return graph, flow, {n.name: n for n in graph.module.graph.nodes}


def test_a_view_into_heads_makes_each_head_one_unit():
    _, flow, nodes = traced()
    a = flow.members["fc1.weight", 0].atoms.tolist()
    assert nx.node_connected_component(flow.coupling, a[0]) == set(a[:4])
    assert nx.node_connected_component(flow.coupling, a[4]) == set(a[4:])
    assert flow.tags[nodes["view"]].dims == (2, 3)
    assert flow.tags[nodes["transpose"]].dims == (1, 3)
    assert flow.tags[nodes["transpose"]].atoms.tolist() == [a[:4], a[4:]]
    assert flow.tags[nodes["reshape"]].dims == (2,) and flow.members["fc2.weight", 1].atoms.tolist() == a


def test_slice_expand_and_permute_move_the_channel_dims():
    _, flow, nodes = traced()
    c = flow.members["conv.weight", 0].atoms.tolist()
    assert flow.tags[nodes["expand"]].dims == (1,) and flow.tags[nodes["expand"]].atoms.tolist() == c
    assert flow.tags[nodes["slice_2"]].atoms.tolist() == c[1:5]
    assert flow.tags[nodes["permute"]].dims == (3,)
    assert flow.members["fc3.weight", 1].atoms.tolist() == c[1:5]
    assert not nx.has_path(flow.coupling, c[0], c[1])


def test_rewrites_follow_the_cut():
    _, flow, nodes = traced()
    a, c = flow.members["fc1.weight", 0].atoms, flow.members["conv.weight", 0].atoms
    removed = torch.zeros(flow.coupling.number_of_nodes(), dtype=torch.bool)
    removed[a[4:]] = True  # the second head
    removed[c[[0, 2]]] = True  # conv channels 0 and 2: the slice 1:5 keeps 1, 3, 4
    cut = Cut(flow.tags, removed)
    for node, step in flow.steps.items():
        step.rule.rewrite(node, step, cut)
    batch = nodes["view"].args[1][0]
    assert nodes["view"].args[1] == [batch, 5, 1, 4]
    assert nodes["reshape"].args[1] == [batch, 5, 4]
    assert nodes["expand"].args[1] == [-1, 4, 4, 4]
    assert nodes["slice_2"].args == (nodes["slice_1"], 1, 0, 3)


def test_selecting_one_channel_blocks():
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x)[:, 0].mean()

    _, flow = traced_flow(Pick(), torch.randn(2, 3, 4, 4))
    (reason,) = {flow.blocked.get(a) for a in flow.members["conv.weight", 0].atoms.tolist()}
    assert reason == "select (aten.select.int): selects one channel"


def test_a_roll_along_other_dims_passes_and_along_the_channels_blocks():
    class Rolled(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.conv2(torch.roll(self.conv1(x), 1, self.dim)).mean((2, 3))

    _, flow = traced_flow(Rolled(2), torch.randn(2, 3, 4, 4))
    assert not any(a in flow.blocked for a in flow.members["conv1.weight", 0].atoms.tolist())
    _, flow = traced_flow(Rolled(1), torch.randn(2, 3, 4, 4))
    (reason,) = {flow.blocked.get(a) for a in flow.members["conv1.weight", 0].atoms.tolist()}
    assert reason == "roll (aten.roll.default): moves values across the channels"


def test_selecting_q_k_v_of_a_fused_projection_keeps_that_dim_whole():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 2)

        def forward(self, x):
            q, k, v = self.qkv(x).view(-1, 3, 4).unbind(1)  # the outer index is q, k or v
            return self.out(q * k + v)

    graph, flow = traced_flow(Fused(), torch.randn(2, 4))
    groups = channel_groups(graph, flow)
    (group,) = groups.of("qkv.weight", "out")
    (rows,) = [m for m in group.members if m.name == "qkv.weight"]  # channel j of q, k and v
    assert group.size == 4 and [i.tolist() for i in rows.index] == [[j, j + 4, j + 8] for j in range(4)]
    assert group.prunable.all()
    for name, mask in group_masks(graph, groups, {group.id: torch.tensor([True, False, False, True])}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("qkv.weight").shape == (6, 4)
