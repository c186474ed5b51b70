"""channel-groups: coupled layers and index maps on the zoo, unprunable channels, where the
result is stored, and that it survives a copy and notices a changed graph."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import chop
from chop.ir.masks import insert_mask
from chop.ir.meta import CHANNEL_GROUPS
from chop.passes.analysis.channel_groups import KEY, channel_groups, stored_channel_groups
from chop.passes.export.shrink import shrink
from chop.pipeline import registry
from zoo import ZOO, trace


def group_with(groups, name, role="out"):
    found = groups.of(name, role)
    assert len(found) == 1, (name, role, found)
    return found[0]


def index_of(group, name, dim):
    (member,) = [m for m in group.members if m.name == name and m.dim == dim]
    return [t.tolist() for t in member.index]


def test_vgg_conv_bn_relu_chain_and_flatten_into_linear():
    _, graph = trace("vgg")
    groups = channel_groups(graph)
    first = group_with(groups, "features.0.weight")
    assert first.size == 16 and bool(first.prunable.all())
    assert {(m.name, m.dim, m.role) for m in first.members} == {
        ("features.0.weight", 0, "out"), ("features.0.bias", 0, "out"),
        ("features.1.weight", 0, "channel"), ("features.1.bias", 0, "channel"),
        ("features.1.running_mean", 0, "channel"), ("features.1.running_var", 0, "channel"),
        ("features.3.weight", 1, "in"),
    }
    last = group_with(groups, "features.10.weight")  # 32 channels of 4×4 flattened into fc
    assert index_of(last, "classifier.0.weight", 1) == [list(range(16 * c, 16 * c + 16)) for c in range(32)]
    head = group_with(groups, "classifier.3.weight")
    assert not head.prunable.any() and "model output" in head.blocked[0]
    assert sorted(g.size for g in groups) == sorted([16, 16, 32, 32, 64, 10])


def test_resnet_residual_adds_share_one_group_with_the_shortcut():
    _, graph = trace("resnet")
    groups = channel_groups(graph)
    stream = group_with(groups, "stem.0.weight")
    assert set(stream.layers("out")) == {"stem.0.weight", "layer1.b.0.weight"}
    assert set(stream.layers("in")) == {"layer1.a.0.weight", "layer2.a.0.weight", "layer2.short.0.weight"}
    down = group_with(groups, "layer2.short.0.weight")
    assert set(down.layers("out")) == {"layer2.b.0.weight", "layer2.short.0.weight"}
    assert down.layers("in") == ["fc.weight"] and down.size == 32


def test_mobilenet_depthwise_and_grouped_convs():
    _, graph = trace("mobilenet")
    groups = channel_groups(graph)
    stem = group_with(groups, "stem.0.weight")
    dw = [m for m in stem.members if m.name == "dw1.0.weight"]
    assert dw and dw[0].role == "channel" and stem.size == 16  # depthwise follows its input
    # grouped 1×1 (4 groups of 6 inputs): input channel j is removed from every group at once,
    # which joins the inverted residual stream (pw1 + project) in units of 4 channels
    stream = group_with(groups, "pw1.0.weight")
    assert set(stream.layers("out")) == {"pw1.0.weight", "project.0.weight"}
    assert index_of(stream, "pw1.0.weight", 0) == [[j, j + 6, j + 12, j + 18] for j in range(6)]
    assert index_of(stream, "grouped.0.weight", 1) == [[j] for j in range(6)]
    out = group_with(groups, "grouped.0.weight")
    assert index_of(out, "grouped.0.weight", 0) == [[j, j + 8, j + 16, j + 24] for j in range(8)]


def test_inception_concat_and_split_map_index_ranges():
    _, graph = trace("inception")
    groups = channel_groups(graph)
    assert index_of(group_with(groups, "b1.weight"), "mix.weight", 1) == [[i] for i in range(8)]
    assert index_of(group_with(groups, "b3.weight"), "mix.weight", 1) == [[i] for i in range(8, 20)]
    assert index_of(group_with(groups, "bp.weight"), "mix.weight", 1) == [[i] for i in range(20, 24)]
    halves = groups.of("mix.weight", "out")
    assert [index_of(g, "mix.weight", 0) for g in halves] == [[[i] for i in range(8)],
                                                              [[i] for i in range(8, 16)]]
    assert [g.layers("in") for g in halves] == [["fc.weight"], ["side.weight"]]


def test_bert_heads_ffn_and_unprunable_hidden_stream():
    _, graph = trace("bert")
    groups = channel_groups(graph)
    prefix = "bert.encoder.layer.0.attention."
    heads = group_with(groups, prefix + "self.query.weight")
    assert heads.kind == "head" and heads.size == 4
    rows = [list(range(8 * h, 8 * h + 8)) for h in range(4)]
    for name in ("self.query.weight", "self.key.weight", "self.value.weight", "self.value.bias"):
        assert index_of(heads, prefix + name, 0) == rows
    assert index_of(heads, prefix + "output.dense.weight", 1) == rows
    ffn = group_with(groups, "bert.encoder.layer.1.intermediate.dense.weight")
    assert ffn.kind == "channel" and ffn.size == 64 and bool(ffn.prunable.all())
    hidden = group_with(groups, prefix + "output.dense.weight")
    assert not hidden.prunable.any() and "layer_norm normalises" in hidden.blocked[0]
    # the stream starts at the embeddings: their columns are members of the same group
    assert {"bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight"} <= set(hidden.layers())


def test_gpt2_fused_qkv_split_into_heads():
    _, graph = trace("gpt2")
    groups = channel_groups(graph)
    heads = group_with(groups, "transformer.h.1.attn.c_attn.weight")
    assert heads.kind == "head" and heads.size == 4
    expected = [list(range(8 * h, 8 * h + 8)) + list(range(32 + 8 * h, 40 + 8 * h))
                + list(range(64 + 8 * h, 72 + 8 * h)) for h in range(4)]
    got = [sorted(x) for x in index_of(heads, "transformer.h.1.attn.c_attn.weight", 1)]
    assert got == expected  # Conv1D weight is [in, out]: heads are columns
    rows = [list(range(8 * h, 8 * h + 8)) for h in range(4)]
    assert index_of(heads, "transformer.h.1.attn.c_proj.weight", 0) == rows
    assert group_with(groups, "transformer.h.0.mlp.c_fc.weight").size == 128
    # the tied embedding: its columns are the hidden stream (LayerNorm'd), its rows the vocabulary
    # logits (model outputs); neither can go
    stream, vocab = groups.of("transformer.wte.weight", "out")
    assert {(m.name, m.dim) for m in stream.members} >= {("transformer.wte.weight", 1),
                                                          ("transformer.h.0.attn.c_proj.weight", 1)}
    assert not stream.prunable.any() and "normalises over these channels" in stream.blocked[0]
    assert vocab.size == 120 and not vocab.prunable.any() and "model output" in vocab.blocked[0]


def test_an_op_it_does_not_understand_makes_its_channels_unprunable():
    _, graph = trace("opaque")
    groups = channel_groups(graph)
    conv2 = group_with(groups, "conv2.weight")
    assert not conv2.prunable.any()
    assert "cumsum" in conv2.blocked[0] and "not understood" in conv2.blocked[0]
    assert bool(group_with(groups, "conv1.weight").prunable.all())
    reasons = [r for _, _, r in groups.unprunable()]
    assert any("cumsum" in r for r in reasons) and any("model output" in r for r in reasons)


def test_the_pass_stores_groups_on_the_graph_and_weight_nodes():
    assert registry.get("channel-groups").name == "channel-groups"
    _, graph = trace("resnet")
    chop.run(graph, "channel-groups")
    info = graph.history[-1].info
    assert info["groups"] == 5 and info["channels"] == 16 + 16 + 32 + 32 + 10
    assert info["prunable"] == info["channels"] - 10
    stored = graph.module.meta["chop"][KEY]
    assert stored_channel_groups(graph) is stored
    entry = graph.weight_node("layer1.a.0.weight").meta["chop"][KEY]
    assert set(entry) == {0, 1} and CHANNEL_GROUPS.check(entry, graph.parameter("layer1.a.0.weight")) is None
    assert entry[1].unique().tolist() == [group_with(stored, "stem.0.weight").id]
    assert CHANNEL_GROUPS.check({0: torch.zeros(3, dtype=torch.long)}, torch.zeros(4, 2)) is not None


def summary(groups):
    return [(g.id, g.kind, g.units, g.blocked,
             [(m.name, m.dim, m.kind, m.role, [i.tolist() for i in m.index]) for m in g.members])
            for g in groups]


def sequential():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return chop.trace(model, (torch.randn(2, 4),))


@pytest.mark.parametrize("name", ["sequential", "resnet", "bert"])
def test_a_copy_after_channel_groups_runs_and_carries_the_same_groups(name):
    graph = sequential() if name == "sequential" else trace(name)[1]
    chop.run(graph, "channel-groups")
    twin = graph.copy()
    stored = twin.module.meta["chop"][KEY]
    assert stored is not graph.module.meta["chop"][KEY]
    assert stored_channel_groups(twin) is stored  # carried over and still current
    assert summary(stored) == summary(graph.module.meta["chop"][KEY]) == summary(channel_groups(twin))
    args, kwargs = ((torch.randn(3, 4),), {}) if name == "sequential" else ZOO[name].inputs(3)
    with torch.no_grad():
        expected = graph(*args, **kwargs)
        got = twin(*args, **kwargs)
    torch.testing.assert_close(getattr(got, "logits", got), getattr(expected, "logits", expected))


def test_groups_pickle_and_an_unpickled_copy_is_not_taken_for_the_graphs():
    graph = sequential()
    chop.run(graph, "channel-groups")
    stored = graph.module.meta["chop"][KEY]
    twin = pickle.loads(pickle.dumps(stored))  # torch's op objects in its signature do not pickle
    assert summary(twin) == summary(stored) and twin.flow is None
    graph.module.meta["chop"][KEY] = twin
    fresh = stored_channel_groups(graph)  # its signature names the ops: recomputed, the same
    assert fresh is not twin and summary(fresh) == summary(stored)


def test_stored_groups_survive_masks_and_are_recomputed_after_a_plain_shrink():
    graph = sequential()
    chop.run(graph, "channel-groups")
    stored = graph.module.meta["chop"][KEY]
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:, 3] = False  # the second layer no longer reads channel 3 of the first
    insert_mask(graph, graph.weight_node("2.weight"), mask)
    graph.recompile()
    assert stored_channel_groups(graph) is stored  # mask nodes do not change the groups
    shrink(graph)  # outside the pass manager: nothing drops the stored groups but the check
    fresh = stored_channel_groups(graph)
    assert fresh is not stored and graph.module.meta["chop"][KEY] is fresh
    assert group_with(fresh, "0.weight").size == 7


def test_stored_groups_are_recomputed_after_an_op_is_added():
    graph = sequential()
    chop.run(graph, "channel-groups")
    stored = graph.module.meta["chop"][KEY]
    relu = next(n for n in graph.module.graph.nodes if n.name == "relu")
    with graph.module.graph.inserting_after(relu):
        cumsum = graph.module.graph.call_function(torch.ops.aten.cumsum.default, (relu, 1))
    relu.replace_all_uses_with(cumsum, delete_user_cb=lambda user: user is not cumsum)
    cumsum.meta["val"] = relu.meta["val"]
    graph.recompile()
    fresh = stored_channel_groups(graph)
    assert fresh is not stored and not group_with(fresh, "0.weight").prunable.any()
    assert "cumsum" in group_with(fresh, "0.weight").blocked[0]


@pytest.fixture
def walks(monkeypatch) -> list:
    """The graphs shrink walks for channels (a spy on its ``trace_channels``, which still runs)."""
    import chop.passes.export.shrink as shrink_module

    seen = []
    real = shrink_module.trace_channels
    monkeypatch.setattr(shrink_module, "trace_channels", lambda g: seen.append(g) or real(g))
    return seen


def test_shrink_reuses_the_walk_of_the_stored_groups_while_the_graph_is_the_one_walked(walks):
    graph = sequential()
    chop.run(graph, "random, mask{granularity=channel, sparsity=0.5}")
    twin = graph.copy()  # the walk is not copied: its nodes are the original graph's
    assert twin.module.meta["chop"][KEY].flow is None
    assert graph.module.meta["chop"][KEY].flow is not None
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = graph(x)
    chop.run(graph, "shrink")
    assert walks == [] and KEY not in graph.module.meta["chop"]  # reused, then dropped
    chop.run(twin, "shrink")
    assert walks == [twin]
    with torch.no_grad():
        torch.testing.assert_close(graph(x), expected)
        torch.testing.assert_close(twin(x), expected)
    assert [p.shape for p in graph.module.parameters()] == [p.shape for p in twin.module.parameters()]


def test_a_walk_is_not_reused_once_a_node_was_replaced(walks):
    graph = sequential()
    chop.run(graph, "random, mask{granularity=channel, sparsity=0.5}")
    relu = next(n for n in graph.module.graph.nodes if n.name == "relu")
    with graph.module.graph.inserting_after(relu):  # the same op, a new node
        twin = graph.module.graph.call_function(relu.target, relu.args, relu.kwargs)
    relu.replace_all_uses_with(twin)
    graph.module.graph.erase_node(relu)
    twin.meta["val"] = relu.meta["val"]
    graph.recompile()
    shrink(graph)
    assert walks == [graph]


def test_equal_rows_are_told_apart_from_rows_whose_hashes_collide():
    from chop.passes.analysis.channel_groups import _same_rows

    w = torch.randint(1, 1 << 20, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    # rows [0, w0 + ...] built so that both hash to w0 + w1 + w0·w1 (see _same_rows)
    rows = [[0, w[0]], [w[1], 0], [0, w[0]], [5]]
    row = torch.tensor([r for r, values in enumerate(rows) for _ in values])
    col = torch.tensor([c for values in rows for c in range(len(values))])
    value = torch.tensor([v for values in rows for v in values])
    lengths = torch.tensor([len(values) for values in rows])
    labels = _same_rows(row, col, value, lengths, lengths.cumsum(0) - lengths).tolist()
    assert labels[0] == labels[2] and len({labels[0], labels[1], labels[3]}) == 3


@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_groups_of_a_parameter_match_its_memberships(name):
    groups = channel_groups(trace(name)[1])

    def brute(param, role=None):
        return [g.id for g in groups.groups
                if any(m.name == param and role in (None, m.role) for m in g.members)]

    names = {m.name for g in groups for m in g.members}
    for _ in range(2):  # then again after the list of groups is replaced
        for param in sorted(names) + ["missing.weight"]:
            for role in (None, "out", "channel", "in"):
                assert [g.id for g in groups.of(param, role)] == brute(param, role)
        groups.groups = groups.groups[1:]


class ConvTwice(nn.Module):
    """One conv applied twice: its output channels are its own input channels at the second
    use, and the model input's at the first."""

    def __init__(self):
        super().__init__()
        self.c, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.c(torch.relu(self.c(x))).mean((2, 3)))


def test_a_conv_applied_to_the_model_input_and_again_keeps_its_channels():
    """Every use of a weight slices the same tensor: the first use reads the model input,
    whose channels never go, so neither do c's input channels nor (through the second use)
    its output channels; the mask pass says so instead of shrink failing."""
    x = torch.randn(2, 8, 8, 8)
    graph = chop.trace(ConvTwice().eval(), (x,))
    group = group_with(channel_groups(graph), "c.weight")
    assert {(m.name, m.dim) for m in group.members} >= {("c.weight", 0), ("c.weight", 1)}
    assert not group.prunable.any()
    assert group.blocked[0] == ("c.weight (dim 1) is also applied by conv2d to x, whose "
                                "channels cannot be removed")
    with pytest.raises(chop.errors.PassError, match=r"c\.weight \(dim 1\) is also applied by"):
        chop.run(graph, "snip, mask{granularity=channel, sparsity=0.5}",
                 data=[((x,), torch.tensor([0, 1]))])


class SharedBranches(nn.Module):
    """``c`` applied to ``relu(a(x))`` and to the model input ``x``, in either order."""

    def __init__(self, input_first: bool):
        super().__init__()
        self.input_first = input_first
        self.a, self.c = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.d, self.head = nn.Conv2d(6, 6, 1), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.c(x) + self.c(h) if self.input_first else self.c(h) + self.c(x)
        return self.head(torch.relu(self.d(torch.relu(y))).mean((2, 3)))


@pytest.mark.parametrize("input_first", [True, False], ids=["input-first", "input-second"])
def test_a_shared_conv_in_parallel_branches_blocks_what_one_use_cannot_slice(input_first):
    graph = chop.trace(SharedBranches(input_first).eval(), (torch.randn(2, 3, 8, 8),))
    groups = channel_groups(graph)
    fed = group_with(groups, "a.weight")  # a's channels are c's input channels, as x's are
    assert fed.layers("in") == ["c.weight"] and not fed.prunable.any()
    assert fed.blocked[0].startswith("c.weight (dim 1) is also applied by conv2d")
    out = group_with(groups, "c.weight")  # c's output channels read nothing untracked
    assert out.size == 6 and bool(out.prunable.all())
