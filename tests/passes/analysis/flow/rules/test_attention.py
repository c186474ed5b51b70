"""The attention rule: a head's q, k and v rows go together; grouped-query attention blocks; a
head whose values are constant outputs that constant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.export.constants import channel_constants

from zoo import traced_flow


class Attention(nn.Module):
    def __init__(self, kv_heads: int = 2):
        super().__init__()
        self.q, self.out = nn.Linear(8, 8), nn.Linear(8, 8)
        self.k, self.v = nn.Linear(8, 4 * kv_heads), nn.Linear(8, 4 * kv_heads)
        self.gqa = kv_heads != 2

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa)
        return self.out(y.transpose(1, 2).reshape(b, n, 8))


def test_each_head_is_one_unit_of_its_q_k_v_rows_and_output_columns():
    graph, flow = traced_flow(Attention(), torch.randn(2, 5, 8))
    (heads,) = [g for g in channel_groups(graph, flow) if g.kind == "head"]
    rows = [list(range(4)), list(range(4, 8))]
    for name in ("q.weight", "k.weight", "v.weight", "v.bias"):
        (member,) = [m for m in heads.members if m.name == name]
        assert [i.tolist() for i in member.index] == rows
    (columns,) = [m for m in heads.members if m.name == "out.weight"]
    assert columns.dim == 1 and [i.tolist() for i in columns.index] == rows
    assert heads.prunable.all()


def test_a_head_with_constant_values_outputs_them():
    model = Attention()
    with torch.no_grad():
        model.v.weight[4:] = 0
    graph, flow = traced_flow(model, torch.randn(2, 5, 8))
    sdpa = next(n for n in graph.module.graph.nodes if "attention" in n.name)
    value, known = channel_constants(graph, flow)[sdpa]
    assert known.tolist() == [[False] * 4, [True] * 4]
    assert value[1].tolist() == model.v.bias[4:].tolist()
    with torch.no_grad():  # what the model computes
        x = torch.randn(3, 5, 8)
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, 4).transpose(1, 2) for p in (model.q, model.k, model.v))
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v)[:, 1],
                                   model.v.bias[4:].expand(3, 5, 4))


def test_grouped_query_attention_blocks():
    _, flow = traced_flow(Attention(kv_heads=1), torch.randn(2, 5, 8))
    (reason,) = {flow.blocked.get(a) for a in flow.members["q.weight", 0].atoms.tolist()}
    assert reason.endswith(": grouped-query attention")
