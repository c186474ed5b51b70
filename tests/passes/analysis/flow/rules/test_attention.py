"""Attention rules: a head's q, k and v rows go together, with rotary tables (full and partial)
and grouped-query k/v (a kv head with its query heads); a per-head mask that is the same for
every head is respelt to broadcast; nn.MultiheadAttention's folded heads; a head whose values are
constant outputs that constant. Each shrinks exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chop.ir.masks import insert_mask
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.group_select import group_masks
from chop.passes.export.constants import channel_constants
from chop.passes.export.shrink import shrink
from zoo import CrossAttention, traced_flow


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


def test_grouped_query_attention_makes_a_kv_head_one_unit_with_its_query_heads():
    graph, flow = traced_flow(Attention(kv_heads=1), torch.randn(2, 5, 8))
    (heads,) = [g for g in channel_groups(graph, flow) if g.kind == "head"]
    assert heads.size == 1 and heads.prunable.all()  # both query heads share the one kv head
    rows = {m.name: m.index[0].tolist() for m in heads.members if m.dim == 0}
    assert rows == {"q.weight": list(range(8)), "q.bias": list(range(8)),
                    "k.weight": list(range(4)), "k.bias": list(range(4)),
                    "v.weight": list(range(4)), "v.bias": list(range(4))}


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Rotary(nn.Module):
    """Llama's attention: q/k/v projections, rotary tables broadcast over heads (partial: the
    first ``rotary`` features of each head), grouped-query k/v repeated by expand + reshape."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 4, rotary: int = 4):
        super().__init__()
        self.heads, self.kv, self.hd, self.rot = heads, kv_heads, head_dim, rotary
        self.q = nn.Linear(8, heads * head_dim, bias=False)
        self.k = nn.Linear(8, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(8, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, 8, bias=False)
        self.register_buffer("freq", torch.rand(rotary // 2))

    def forward(self, x):
        b, n, _ = x.shape
        angle = torch.arange(n)[:, None] * self.freq[None]
        cos, sin = torch.cat([angle, angle], -1).cos()[None, None], torch.cat([angle, angle], -1).sin()[None, None]
        q = self.q(x).view(b, n, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.hd).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.hd).transpose(1, 2)
        (qr, qp), (kr, kp) = (t.split([self.rot, self.hd - self.rot], -1) for t in (q, k))
        q = torch.cat([qr * cos + rotate_half(qr) * sin, qp], -1)
        k = torch.cat([kr * cos + rotate_half(kr) * sin, kp], -1)
        rep = self.heads // self.kv
        k, v = (t[:, :, None].expand(b, self.kv, rep, n, self.hd).reshape(b, self.heads, n, self.hd)
                for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("rotary", [4, 2])  # full and partial rotary (Phi)
def test_rotary_keeps_heads_whole_and_gqa_joins_a_kv_head_with_its_query_heads(rotary):
    graph, flow = traced_flow(Rotary(head_dim=4, rotary=rotary), torch.randn(2, 5, 8))
    (heads,) = [g for g in channel_groups(graph, flow) if g.kind == "head"]
    assert heads.size == 2 and heads.prunable.all()  # one unit per kv head
    rows = {m.name: [i.tolist() for i in m.index] for m in heads.members}
    assert rows["q.weight"] == [list(range(8)), list(range(8, 16))]  # query heads 0-1 and 2-3
    assert rows["k.weight"] == rows["v.weight"] == [list(range(4)), list(range(4, 8))]
    assert rows["o.weight"] == rows["q.weight"]


@pytest.mark.parametrize("rotary", [4, 2])
def test_rotary_gqa_attention_shrinks_exactly(rotary):
    torch.manual_seed(0)
    model = Rotary(rotary=rotary).eval()
    graph, flow = traced_flow(model, torch.randn(2, 5, 8))
    groups = channel_groups(graph, flow)
    (heads,) = [g for g in groups if g.kind == "head"]
    for name, mask in group_masks(graph, groups, {heads.id: torch.tensor([False, True])}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(3, 5, 8)  # another batch
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert {n: tuple(p.shape) for n, p in graph.module.named_parameters()} == {
        "q.weight": (8, 8), "k.weight": (4, 8), "v.weight": (4, 8), "o.weight": (8, 8)}


def test_a_mask_spelt_per_head_but_equal_for_all_is_respelt_to_broadcast():
    torch.manual_seed(0)
    model = CrossAttention().eval()
    graph, flow = traced_flow(model, torch.randn(2, 5, 8), torch.randn(2, 6, 8))
    groups = channel_groups(graph, flow)
    (heads,) = [g for g in groups if g.kind == "head"]
    assert heads.prunable.all()
    for name, mask in group_masks(graph, groups, {heads.id: torch.tensor([True, False])}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 6, 8)
    with torch.no_grad():
        expected = graph(x, memory)
        shrink(graph)
        torch.testing.assert_close(graph(x, memory), expected)
    zeros = next(n for n in graph.module.graph.nodes if n.target is torch.ops.aten.zeros.default)
    assert zeros.args[0][1] == 1 and graph.parameter("q.weight").shape == (4, 8)


class Fused(nn.Module):
    """nn.MultiheadAttention (heads folded into the batch inside) after a class token."""

    def __init__(self, need_weights: bool):
        super().__init__()
        self.need = need_weights
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        return self.fc(self.attn(x, x, x, need_weights=self.need)[0][:, 0])


@pytest.mark.parametrize("need_weights", [False, True])  # the SDPA path and the bmm path
def test_multihead_attention_heads_are_units_of_the_fused_projection(need_weights):
    torch.manual_seed(0)
    graph, flow = traced_flow(Fused(need_weights).eval(), torch.randn(2, 5, 8))
    groups = channel_groups(graph, flow)
    (heads,) = [g for g in groups if g.kind == "head"]
    (rows,) = [m for m in heads.members if m.name == "attn.in_proj_weight"]
    assert [sorted(i.tolist()) for i in rows.index] == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
                                                        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]]
    assert heads.prunable.all()
    for name, mask in group_masks(graph, groups, {heads.id: torch.tensor([False, True])}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("attn.in_proj_weight").shape == (12, 8)
    assert graph.parameter("attn.out_proj.weight").shape == (8, 4)


def test_a_matmul_with_a_parameter_is_a_weight_op():
    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6, 3))

        def forward(self, x):
            return torch.relu(x @ self.w1) @ self.w2

    graph, flow = traced_flow(Projected(), torch.randn(2, 5, 4))
    groups = channel_groups(graph, flow)
    (hidden,) = groups.of("w1", "out")
    assert hidden.prunable.all() and [(m.name, m.dim) for m in hidden.members] == [("w1", 1), ("w2", 0)]
    for name, mask in group_masks(graph, groups, {hidden.id: torch.arange(6) < 4},
                                  roles=("linear", "other")).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("w1").shape == (4, 4) and graph.parameter("w2").shape == (4, 3)


class Einsummed(nn.Module):
    """MaxViT-style attention written with einsum."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 4).unbind(2)  # [b, n, heads, head_dim]
        attn = torch.einsum("bnhd,bmhd->bhnm", q, k).softmax(-1)
        return self.o(torch.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, n, 8))


def test_einsum_attention_has_heads_and_shrinks_exactly():
    torch.manual_seed(0)
    graph, flow = traced_flow(Einsummed().eval(), torch.randn(2, 5, 8))
    groups = channel_groups(graph, flow)
    (heads,) = [g for g in groups if g.kind == "head"]
    (rows,) = [m for m in heads.members if m.name == "qkv.weight"]
    assert [sorted(i.tolist()) for i in rows.index] == [[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
                                                        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]]
    for name, mask in group_masks(graph, groups, {heads.id: torch.tensor([True, False])}).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        expected = graph(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter("qkv.weight").shape == (12, 8) and graph.parameter("o.weight").shape == (8, 4)


class SingleHead(nn.Module):
    """One head written out (SAGAN, non-local blocks): ``q @ kᵀ`` sums every q/k channel away."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.fc = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        return self.fc(scores.softmax(-1) @ self.v(x))


class SquaredNorm(nn.Module):
    """``h · h`` beside a layer that reads only some of h's channels."""

    def __init__(self):
        super().__init__()
        self.l1, self.fc = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return self.fc(h) + (h.unsqueeze(1) @ h.unsqueeze(2)).squeeze(-1)


@pytest.mark.parametrize("model", [SingleHead, SquaredNorm])
def test_a_product_that_sums_every_channel_away_keeps_them(model):
    torch.manual_seed(0)
    model = model().eval()
    first_name = "q.weight" if isinstance(model, SingleHead) else "l1.weight"
    first = model.get_submodule(first_name.split(".")[0])
    with torch.no_grad():  # channels 0-2 constant: their q/h values still enter the product
        first.weight[:3] = 0
        if isinstance(model, SquaredNorm):
            model.fc.weight[:, 3:5] = 0  # channels 3-4 not read by fc, only by h · h
    shape = (5, 6) if isinstance(model, SquaredNorm) else (2, 5, 8)
    graph, flow = traced_flow(model, torch.randn(shape))
    product = next(n for n in graph.module.graph.nodes if getattr(n.target, "overloadpacket", None)
                   in (torch.ops.aten.matmul, torch.ops.aten.bmm))
    assert "sums these channels away" in flow.blocked[int(flow.tags[product.args[0]].atoms[0])]
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        shrink(graph)
        torch.testing.assert_close(graph(x), expected)
    assert graph.parameter(first_name).shape[0] == 8  # every channel kept
