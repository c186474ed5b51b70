"""The walk: blocking (ops without a rule, the model output, untracked readers) and how it finds
rules (registered ones, in-place variants)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chop.errors import InternalError
from chop.passes.analysis.flow import Rule, Step, Unsupported, register, rule_for
from chop.passes.analysis.flow import rule as rule_module
from chop.passes.analysis.flow.rule import RULES
from zoo import traced_flow

aten = torch.ops.aten


class ConvCumsum(nn.Module):
    """conv1 -> cumsum over ``dim`` -> conv2 -> mean -> fc."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cumsum(self.conv1(x), dim=self.dim)
        return self.fc(self.conv2(y).mean((2, 3)))


def atoms(flow, name: str, dim: int = 0) -> list[int]:
    return flow.members[name, dim].atoms.tolist()


def test_an_op_without_a_rule_blocks_the_channels_it_reads_and_names_itself():
    _, flow = traced_flow(ConvCumsum(dim=1), torch.randn(2, 3, 4, 4))
    reasons = {flow.blocked.get(a) for a in atoms(flow, "conv1.weight")}
    (reason,) = reasons
    assert reason.startswith("cumsum (aten.cumsum.default): ") and "not understood" in reason
    assert not any(a in flow.blocked for a in atoms(flow, "conv2.weight"))
    assert all("reaches the model output" in flow.blocked[a] for a in atoms(flow, "fc.weight"))


def test_a_member_read_by_an_untracked_op_is_blocked():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))) + self.fc1.weight.sum()

    _, flow = traced_flow(Reused(), torch.randn(2, 4))
    (reason,) = {flow.blocked.get(a) for a in atoms(flow, "fc1.weight")}
    assert reason == ("fc1.weight is also read by sum_1 (aten.sum.default), which channel-groups "
                      "does not track")


def test_a_registered_rule_is_found_and_used(monkeypatch):
    monkeypatch.setattr(rule_module, "RULES", dict(RULES))  # register into a scratch registry
    model, x = ConvCumsum(dim=2), torch.randn(2, 3, 4, 4)  # cumsum along height: channel-wise
    _, flow = traced_flow(model, x)
    assert all(a in flow.blocked for a in atoms(flow, "conv1.weight"))

    @register(aten.cumsum)
    class Cumsum(Rule):
        def visit(self, walk, node):
            if node.args[1] in walk.first(node).dims:
                raise Unsupported("sums over the channels")
            walk.same(node, Step(self, [node.args[0]]))

    graph, flow = traced_flow(model, x)
    node = next(n for n in graph.module.graph.nodes if n.name == "cumsum")
    assert isinstance(rule_for(node), Cumsum) and flow.steps[node].rule is rule_for(node)
    assert flow.tags[node].atoms.tolist() == atoms(flow, "conv1.weight")
    assert not any(a in flow.blocked for a in atoms(flow, "conv1.weight"))
    _, flow = traced_flow(ConvCumsum(dim=1), x)
    (reason,) = {flow.blocked.get(a) for a in atoms(flow, "conv1.weight")}
    assert reason == "cumsum (aten.cumsum.default): sums over the channels"
    with pytest.raises(InternalError, match="aten.cumsum has two channel rules: Cumsum and Again"):
        @register(aten.cumsum)
        class Again(Cumsum):
            pass


def test_in_place_ops_use_the_rule_of_their_out_of_place_op():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = F.hardswish(self.conv1(x), inplace=True)
            y.add_(1.0)
            return self.conv2(F.silu(y, inplace=True)).mean((2, 3))

    graph, flow = traced_flow(InPlace(), torch.randn(2, 3, 4, 4))
    ops = {n.target.overloadpacket: n for n in graph.module.graph.nodes if n.op == "call_function"}
    for inplace, plain in ((aten.hardswish_, aten.hardswish), (aten.add_, aten.add), (aten.silu_, aten.silu)):
        assert rule_for(ops[inplace]) is RULES[plain]
        assert flow.tags[ops[inplace]].atoms.tolist() == atoms(flow, "conv1.weight")
    assert not any(a in flow.blocked for a in atoms(flow, "conv1.weight"))
    assert rule_for(ops[aten.mean]) is RULES[aten.mean]


def test_an_unused_op_blocks_nothing_and_folded_channels_block_an_op_that_cannot_follow_them():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv1(x)
            torch.cumsum(y, 1)  # dead code: its result is never used
            return self.conv2(y).mean((2, 3))

    _, flow = traced_flow(Unused(), torch.randn(2, 3, 4, 4))
    assert not any(a in flow.blocked for a in atoms(flow, "conv1.weight"))

    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):  # heads folded into the batch as nn.MultiheadAttention does
            x = x.transpose(0, 1)  # [seq, batch, 4]
            s, b, _ = x.shape
            y = self.fc1(x).view(s, b * 2, 4)
            y = y - y.amax(0, keepdim=True)
            return self.fc2(y.view(s, b, 8))

    _, flow = traced_flow(Folded(), torch.randn(2, 3, 4))
    (reason,) = {flow.blocked.get(a) for a in atoms(flow, "fc1.weight")}
    assert reason == ("amax (aten.amax.default): its operand has channels folded into the "
                      "batch dim, which this op cannot follow")


def test_components_label_each_atom_with_the_smallest_atom_it_is_joined_to():
    import networkx as nx

    from chop.passes.analysis.flow.walk import components

    g = torch.Generator().manual_seed(0)
    for n, e in [(1, 0), (10, 3), (200, 150), (500, 2000)]:
        edges = torch.randint(0, n, (2, e), generator=g)
        first = components(torch.arange(n), edges[:, : e // 2])
        labels = components(first, edges[:, e // 2:])  # incrementally
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        graph.add_edges_from(edges.t().tolist())
        expected = torch.empty(n, dtype=torch.long)
        for part in nx.connected_components(graph):
            expected[list(part)] = min(part)
        assert labels.tolist() == expected.tolist()
