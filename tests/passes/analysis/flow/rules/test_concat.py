"""cat, split and chunk rules: channel positions laid end to end or cut into ranges; an untracked
tensor concatenated in brings blocked atoms, a stacked parameter (a class token) is a member; a
split's (or chunk's) sizes follow the cut."""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

from chop.ir.masks import insert_mask
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.flow.rule import Cut
from chop.passes.analysis.group_select import group_masks
from chop.passes.export.constants import channel_constants
from chop.passes.export.shrink import shrink
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


class GatedMLP(nn.Module):
    """Phi-3's fused gate_up projection, cut in two by chunk: silu(gate) * up -> down."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(4, 12), nn.Linear(6, 4)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up)


def test_chunk_pairs_gate_and_up_rows_with_down_columns_and_is_respelt():
    torch.manual_seed(0)
    graph, flow = traced_flow(GatedMLP().eval(), torch.randn(2, 3, 4))
    groups = channel_groups(graph, flow)
    (group,) = groups.of("gate_up.weight", "out")
    (rows,) = [m for m in group.members if m.name == "gate_up.weight"]
    assert group.size == 6 and [i.tolist() for i in rows.index] == [[j, j + 6] for j in range(6)]
    assert group.layers("in") == ["down.weight"] and group.prunable.all()
    for name, mask in group_masks(graph, groups, {group.id: torch.arange(6) % 2 == 1}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    split = next(n for n in graph.module.graph.nodes if n.target is aten.split_with_sizes.default)
    assert split.args[1] == [3, 3] and graph.parameter("gate_up.weight").shape == (6, 4)


class ClassToken(nn.Module):
    """A class token (a parameter) stacked in front of the tokens, along a dim without channels."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Linear(4, 6), nn.Linear(6, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], 1)
        return self.fc(torch.relu(x).mean(1))


def test_a_stacked_parameter_is_a_member_of_the_channels_it_meets():
    torch.manual_seed(0)
    graph, flow = traced_flow(ClassToken().eval(), torch.randn(2, 3, 4))
    cls = flow.members["cls", 2]
    assert cls.role == "channel" and cls.atoms.tolist() == flow.members["embed.weight", 0].atoms.tolist()
    groups = channel_groups(graph, flow)
    (group,) = groups.of("embed.weight", "out")
    assert group.prunable.all()
    for name, mask in group_masks(graph, groups, {group.id: torch.arange(6) < 4}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("cls").shape == (1, 1, 4)
