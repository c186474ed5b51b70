"""Gather rules: an embedding's columns are channels (the hidden size of the stream it starts), a
relative position bias table gives one column per head, and indexing tokens keeps the channels."""

from __future__ import annotations

import networkx as nx
import torch
from torch import nn

from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.export.constants import channel_constants
from zoo import traced_flow


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, ids):
        x = self.embed(ids)  # [b, n, 6]
        return self.fc2(torch.relu(self.fc1(x[:, 0])))  # the first token


def test_embedding_columns_are_the_channels_it_outputs_and_a_zero_column_is_constant():
    model = Tokens()
    with torch.no_grad():
        model.embed.weight[:, 2] = 0
    graph, flow = traced_flow(model, torch.randint(0, 10, (2, 5)))
    columns = flow.members["embed.weight", 1]
    assert columns.role == "out" and columns.atoms.tolist() == flow.members["fc1.weight", 1].atoms.tolist()
    embedding = next(n for n in graph.module.graph.nodes if n.name == "embedding")
    value, known = channel_constants(graph, flow)[embedding]
    assert known.tolist() == [False, False, True, False, False, False] and value[2] == 0
    group = channel_groups(graph, flow).of("embed.weight", "out")[0]
    assert group.prunable.all() and group.layers("in") == ["fc1.weight"]


class RelativeBias(nn.Module):
    """T5-style: a bias table [buckets, heads] looked up by relative position, added per head to
    the scores of two attention layers (shared)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(7, 2)
        self.q1, self.k1, self.v1, self.o1 = (nn.Linear(8, 8) for _ in range(4))
        self.q2, self.k2, self.v2, self.o2 = (nn.Linear(8, 8) for _ in range(4))

    def attend(self, x, q, k, v, o, bias):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 2, 4).transpose(1, 2) for p in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return o(y.transpose(1, 2).reshape(b, n, 8))

    def forward(self, x):
        n = x.shape[1]
        pos = torch.arange(n)
        bias = self.table((pos[None, :] - pos[:, None]).clamp(-3, 3) + 3).permute(2, 0, 1)[None]
        x = x + self.attend(x, self.q1, self.k1, self.v1, self.o1, bias)
        return x + self.attend(x, self.q2, self.k2, self.v2, self.o2, bias)


def test_a_relative_bias_table_joins_its_columns_to_the_heads_of_every_layer_it_feeds():
    graph, flow = traced_flow(RelativeBias(), torch.randn(2, 5, 8))
    heads = [g for g in channel_groups(graph, flow) if g.kind == "head"]
    assert len(heads) == 1 and heads[0].size == 2
    (table,) = [m for m in heads[0].members if m.name == "table.weight"]
    assert table.dim == 1 and [i.tolist() for i in table.index] == [[0], [1]]
    for layer in ("q1", "k1", "v1", "q2", "k2", "v2"):  # the shared bias ties the two layers
        (rows,) = [m for m in heads[0].members if m.name == f"{layer}.weight"]
        assert [i.tolist() for i in rows.index] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    a = flow.members["q1.weight", 0].atoms
    assert nx.has_path(flow.coupling, int(a[0]), int(flow.members["q2.weight", 0].atoms[0]))
