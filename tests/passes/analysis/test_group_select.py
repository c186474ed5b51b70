"""group_select: scores per channel and head, keep decisions turned into exact masks, and the
granularity checks with the layer and the reason in their messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chop
from chop.errors import GranularityError, MissingMetadataError
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.group_select import group_masks, group_scores, require_granularity

from zoo import trace


def group_with(groups, name, role="out"):
    found = groups.of(name, role)
    assert len(found) == 1, (name, role, found)
    return found[0]


def small():
    """Linear(4, 3) -> ReLU -> Linear(3, 2): one prunable group of 3 channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    graph = chop.trace(model, (torch.randn(2, 4),))
    return graph, channel_groups(graph)


def test_group_masks_drop_exactly_the_rows_columns_and_entries_of_the_dropped_channels():
    graph, groups = small()
    hidden = group_with(groups, "0.weight")
    masks = group_masks(graph, groups, {hidden.id: torch.tensor([True, False, True])})
    assert set(masks) == {"0.weight", "2.weight"}
    assert masks["0.weight"].tolist() == [[True] * 4, [False] * 4, [True] * 4]
    assert masks["2.weight"].tolist() == [[True, False, True]] * 2
    with_bias = group_masks(graph, groups, {hidden.id: torch.tensor([False, True, True])},
                            roles=("bias",))
    assert with_bias == {"0.bias": with_bias["0.bias"]} and with_bias["0.bias"].tolist() == [False, True, True]


def test_group_scores_sum_member_entries_of_the_key_per_channel():
    graph, groups = small()
    hidden = group_with(groups, "0.weight")
    nodes = {n.target: n for n in graph.weight_nodes()}
    nodes["0.weight"].meta["chop"]["saliency"] = torch.arange(12.0).view(3, 4)
    nodes["2.weight"].meta["chop"]["saliency"] = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 4.0]])
    scores = group_scores(graph, groups)
    assert set(scores) == {hidden.id, group_with(groups, "2.weight").id}
    assert scores[hidden.id].tolist() == [6.0 + 4.0, 22.0 + 0.0, 38.0 + 6.0]
    assert group_scores(graph, groups, granularity="head") == {}  # no head groups here
    with pytest.raises(MissingMetadataError, match=r"no channel group of \w+ has a 'other' entry; "
                                                   r"run a criterion \(snip, magnitude, random\)"):
        group_scores(graph, groups, key="other")


def test_a_channel_owning_a_block_of_columns_scores_the_whole_block():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(8, 2))  # 2×2 image
    graph = chop.trace(model, (torch.randn(2, 3, 2, 2),))
    groups = channel_groups(graph)
    channels = group_with(groups, "0.weight")
    graph.weight_node("2.weight").meta["chop"]["saliency"] = torch.arange(16.0).view(2, 8)
    # channel 0 owns columns 0-3, channel 1 columns 4-7, over both rows
    assert group_scores(graph, groups)[channels.id].tolist() == [6.0 + 38.0, 22.0 + 54.0]


def test_require_granularity_names_the_layer_and_the_reason():
    _, groups = small()
    require_granularity(groups, ["0.weight", "2.weight"], "channel")  # 2.weight reads channels
    with pytest.raises(GranularityError, match="unknown structured granularity 'row'; use channel or head"):
        require_granularity(groups, ["0.weight"], "row")
    alone = chop.trace(nn.Sequential(nn.Linear(4, 3)), (torch.randn(2, 4),))
    with pytest.raises(GranularityError) as info:
        require_granularity(channel_groups(alone), ["0.weight"], "channel")
    assert str(info.value) == (
        "granularity=channel: layer 0.weight cannot be pruned this way: its channels cannot be "
        "removed: linear reaches the model output (its channels are outputs of the model). "
        "Exclude it (exclude='...') or use granularity=element")


def test_group_scores_sum_member_saliency():
    _, graph = trace("mlp")
    groups = channel_groups(graph)
    g = torch.Generator().manual_seed(0)
    sal = {}
    for node in graph.weight_nodes():
        sal[node.target] = torch.rand(graph.parameter(node).shape, generator=g)
        node.meta["chop"]["saliency"] = sal[node.target]
    scores = group_scores(graph, groups)
    first = group_with(groups, "fc1.weight")
    expected = sal["fc1.weight"].sum(1) + sal["fc1.bias"] + sal["fc2.weight"].sum(0)
    torch.testing.assert_close(scores[first.id], expected.double())


def test_group_masks_remove_whole_rows_columns_and_blocks():
    _, graph = trace("vgg")
    groups = channel_groups(graph)
    last = group_with(groups, "features.10.weight")
    keep = torch.ones(last.size, dtype=torch.bool)
    keep[[3, 7]] = False
    masks = group_masks(graph, groups, {last.id: keep})
    assert set(masks) == {"features.10.weight", "classifier.0.weight"}  # conv/linear roles only
    conv = masks["features.10.weight"]
    assert not conv[[3, 7]].any() and conv.sum() == conv.numel() - 2 * conv[0].numel()
    fc = masks["classifier.0.weight"]
    dropped = [c for c in range(fc.shape[1]) if not fc[:, c].any()]
    assert dropped == list(range(48, 64)) + list(range(112, 128)) and fc[:, ~torch.isin(
        torch.arange(fc.shape[1]), torch.tensor(dropped))].all()
    with_norms = group_masks(graph, groups, {last.id: keep}, roles=("linear", "conv", "norm"))
    assert with_norms["features.11.weight"].tolist() == keep.tolist()


def test_bad_keep_vectors_and_granularities_name_the_layer():
    _, graph = trace("vgg")
    groups = channel_groups(graph)
    out = group_with(groups, "classifier.3.weight")
    cannot = r"cannot remove channel 0 .*classifier\.3\.weight.*model output"
    with pytest.raises(GranularityError, match=cannot):
        group_masks(graph, groups, {out.id: torch.zeros(out.size, dtype=torch.bool)})
    with pytest.raises(GranularityError, match="has 16 channels"):
        group_masks(graph, groups, {0: torch.ones(3, dtype=torch.bool)})
    no_heads = r"granularity=head: .*no attention heads.*features\.0\.weight"
    with pytest.raises(GranularityError, match=no_heads):
        require_granularity(groups, ["features.0.weight"], "head")
    require_granularity(groups, ["features.0.weight", "classifier.3.weight"], "channel")

    _, bert = trace("bert")
    groups = channel_groups(bert)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    require_granularity(groups, [query], "head")
    with pytest.raises(GranularityError, match=rf"layer {query}.*no channel group.*granularity=head"):
        require_granularity(groups, [query], "channel")
    dense = "bert.encoder.layer.0.output.dense.weight"  # rows feed the LayerNorm'd stream
    require_granularity(groups, [dense], "channel")  # its input columns are FFN channels
    with pytest.raises(GranularityError, match=rf"granularity=head: layer {dense}"):
        require_granularity(groups, [dense], "head")
