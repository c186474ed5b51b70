"""cat and split rules: channel positions laid end to end or cut into ranges; an untracked tensor
concatenated in brings blocked atoms; a split's sizes follow the cut."""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

from chop.passes.analysis.flow.rule import Cut
from chop.passes.export.constants import channel_constants

from zoo import traced_flow

aten = torch.ops.aten


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.mix = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(8, 4, 1)
        self.left, self.right = nn.Conv2d(2, 1, 1), nn.Conv2d(2, 1, 1)

    def forward(self, x):
        y = self.mix(torch.cat([self.a(x), x, self.b(x)], 1))
        p, q = y.split([2, 2], 1)
        return self.left(p) + self.right(q)


def test_cat_lays_channels_end_to_end_and_blocks_an_untracked_part():
    model = Branches()
    with torch.no_grad():
        model.b.weight[1] = 0
    graph, flow = traced_flow(model, torch.randn(2, 3, 4, 4))
    a, b = (flow.members[f"{n}.weight", 0].atoms.tolist() for n in "ab")
    read = flow.members["mix.weight", 1].atoms.tolist()
    assert read[:2] == a and read[5:] == b
    assert [flow.blocked.get(x) for x in read[2:5]] == [
        "cat: channels of x are concatenated in but come from a tensor chop cannot shrink"] * 3
    assert not any(x in flow.blocked for x in a + b)
    cat = next(n for n in graph.module.graph.nodes if n.name == "cat")
    value, known = channel_constants(graph, flow)[cat]
    assert known.tolist() == [False] * 6 + [True, False] and value[6] == model.b.bias[1]


def test_split_parts_are_ranges_and_their_sizes_follow_the_cut():
    graph, flow = traced_flow(Branches(), torch.randn(2, 3, 4, 4))
    m = flow.members["mix.weight", 0].atoms
    assert flow.members["left.weight", 1].atoms.tolist() == m[:2].tolist()
    assert flow.members["right.weight", 1].atoms.tolist() == m[2:].tolist()
    removed = torch.zeros(flow.coupling.number_of_nodes(), dtype=torch.bool)
    removed[m[[0, 1, 3]]] = True
    split = next(n for n in graph.module.graph.nodes if n.name == "split_with_sizes")
    flow.steps[split].rule.rewrite(split, flow.steps[split], Cut(flow.tags, removed))
    assert split.target is aten.split_with_sizes.default and split.args[1:] == ([0, 1], 1)


def test_a_cat_along_another_dim_joins_the_parts_and_is_constant_only_where_they_agree():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.mix = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.mix(torch.cat([self.a(x), self.b(x)], 2))

    model = Stacked()
    with torch.no_grad():
        model.a.weight[[0, 1]] = 0
        model.b.weight[[1, 2]] = 0
        model.b.bias[1] = model.a.bias[1]
    graph, flow = traced_flow(model, torch.randn(2, 3, 4, 4))
    a, b = (flow.members[f"{n}.weight", 0].atoms.tolist() for n in "ab")
    assert flow.members["mix.weight", 1].atoms.tolist() == a
    assert all(nx.has_path(flow.coupling, x, y) for x, y in zip(a, b))
    cat = next(n for n in graph.module.graph.nodes if n.name == "cat")
    value, known = channel_constants(graph, flow)[cat]
    assert known.tolist() == [False, True, False] and value[1] == model.a.bias[1]
