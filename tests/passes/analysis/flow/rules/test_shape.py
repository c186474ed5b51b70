"""Shape rules: a view into (heads, head_dim) makes each head one unit; transposes, slices and
expands move channel dims; and each rewrites the sizes it spells out when channels go."""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

from chop.passes.analysis.flow.rule import Cut

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
