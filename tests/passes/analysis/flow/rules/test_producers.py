"""Weight-op rules: output channels are fresh atoms, input channels index the weight's input
dim; ``reads`` and ``delta`` describe the weight exactly (what shrink folds into a bias)."""

from __future__ import annotations

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn

from chop.passes.analysis.flow.rules.producers import Conv, Linear
from zoo import traced_flow


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.plain, self.padded = nn.Conv2d(4, 5, 3), nn.Conv2d(4, 5, 3, padding=1)
        self.grouped = nn.Conv2d(4, 6, 1, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.plain(y), self.padded(y), self.grouped(y), self.fc(y.mean((2, 3)))


def test_consumers_members_and_grouped_joins():
    _, flow = traced_flow(Chain(), torch.randn(2, 3, 6, 6))
    atoms = flow.members["conv1.weight", 0].atoms.tolist()
    consumers = {c.weight: c for c in flow.consumers}
    assert set(consumers) == {"plain.weight", "padded.weight", "grouped.weight", "fc.weight"}
    assert consumers["plain.weight"].folds and not consumers["padded.weight"].folds
    assert isinstance(consumers["fc.weight"].rule, Linear) and isinstance(consumers["plain.weight"].rule, Conv)
    assert flow.members["fc.weight", 1].atoms.tolist() == atoms
    assert flow.members["grouped.weight", 1].atoms.tolist() == atoms[:2]  # 2 inputs per group
    assert nx.has_path(flow.coupling, atoms[0], atoms[2])  # channel j goes from every group
    out = flow.members["grouped.weight", 0].atoms.tolist()
    assert [len(nx.node_connected_component(flow.coupling, a) & set(out)) for a in out] == [2] * 6


def test_reads_and_delta_are_what_the_weight_computes():
    torch.manual_seed(0)
    model = Chain()
    with torch.no_grad():
        model.plain.weight[:, 1] = 0
        model.fc.weight[:, 3] = 0
    _, flow = traced_flow(model, torch.randn(2, 3, 6, 6))
    consumers = {c.weight: c for c in flow.consumers}
    value = torch.tensor([0.5, -1.0, 2.0, 3.0])
    gone = torch.tensor([True, False, True, True])
    x = value.view(1, 4, 1, 1).expand(1, 4, 5, 5) * gone.view(1, 4, 1, 1)  # constant channels
    for name, module, inputs in (("plain.weight", model.plain, x), ("fc.weight", model.fc, x.mean((2, 3)))):
        c, weight = consumers[name], module.weight
        read = c.rule.reads(c, weight)
        assert read.tolist() == [True, name != "plain.weight", True, name != "fc.weight"]
        delta = c.rule.delta(c, weight, value, gone)
        with torch.no_grad():
            got = module(inputs) - module.bias.view(-1, *[1] * (inputs.dim() - 2))
        got = got if got.dim() == 2 else got[..., 0, 0]
        torch.testing.assert_close(delta.float(), got[0])


def test_a_computed_weight_blocks():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.w = nn.Linear(4, 3), nn.Parameter(torch.randn(2, 3))

        def forward(self, x):
            return F.linear(torch.relu(self.fc1(x)), self.w * 2)

    _, flow = traced_flow(Computed(), torch.randn(2, 4))
    (reason,) = {flow.blocked.get(a) for a in flow.members["fc1.weight", 0].atoms.tolist()}
    assert reason == "linear_1 (aten.linear.default): its weight or bias is computed, not a parameter"


def test_a_grouped_conv_reads_the_inputs_its_output_depends_on():
    torch.manual_seed(0)
    model = Chain()
    with torch.no_grad():
        model.grouped.weight[:3, 1] = 0  # group 0 ignores its second input (channel 1)
        model.grouped.weight[3:, 1] = 0  # and so does group 1 (channel 3)
    _, flow = traced_flow(model, torch.randn(2, 3, 6, 6))
    (c,) = [c for c in flow.consumers if c.weight == "grouped.weight"]
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        nudged = [x + torch.eye(4)[j].view(1, 4, 1, 1) for j in range(4)]
        depends = [not torch.equal(model.grouped(x), model.grouped(y)) for y in nudged]
    assert depends == [True, False, True, False]
    assert c.rule.reads(c, model.grouped.weight).tolist() == depends


class WrittenOut(nn.Linear):
    """transformers' FalconLinear: ``x @ self.weight.T + self.bias``."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class TwoWrittenOut(nn.Module):
    def __init__(self, shared_transpose: bool = False):
        super().__init__()
        self.pre, self.a, self.b = nn.Linear(6, 6), WrittenOut(6, 8), WrittenOut(8, 3)
        self.shared_transpose = shared_transpose

    def forward(self, x):
        x = torch.relu(self.pre(x))
        if not self.shared_transpose:
            return self.b(torch.relu(self.a(x)))
        transposed = self.a.weight.T  # one transpose, also read by an op the rule cannot see
        return self.b(torch.relu(x @ transposed + self.a.bias)) + transposed.sum()


def test_a_weight_read_through_a_transpose_is_a_linear_layer():
    """Falcon's x @ wᵀ: its channels were "in no channel group", so nothing could be shrunk."""
    _, flow = traced_flow(TwoWrittenOut(), torch.randn(2, 6))
    assert flow.members["a.weight", 1].atoms.tolist() == flow.members["pre.weight", 0].atoms.tolist()
    atoms = flow.members["a.weight", 0].atoms.tolist()
    assert flow.members["b.weight", 1].atoms.tolist() == atoms  # b reads a's rows
    assert flow.members["a.bias", 0].atoms.tolist() == atoms  # the bias added after the product
    assert not any(flow.blocked.get(a) for a in atoms)
    consumers = {c.weight: c for c in flow.consumers}
    assert isinstance(consumers["b.weight"].rule, Linear) and not consumers["b.weight"].folds


def test_a_transpose_read_by_another_op_blocks():
    _, flow = traced_flow(TwoWrittenOut(shared_transpose=True), torch.randn(2, 6))
    assert ("a.weight", 0) not in flow.members
    reasons = {flow.blocked.get(a) for a in flow.members["pre.weight", 0].atoms.tolist()}
    assert len(reasons) == 1 and reasons.pop().endswith(
        "its transpose numpy_t is also read by other ops")
