"""group_select: scores per channel and head, keep decisions turned into exact masks, the
granularity checks with the layer and the reason in their messages, and structured selection
(a parameter budget met by the shortest prefix of the ranking, a floor per group, the skipped
layers reported, strict)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chop
from chop.errors import GranularityError, MissingMetadataError
from chop.kernels.select import kept_count
from chop.passes.analysis import group_select
from chop.passes.analysis.channel_groups import channel_groups
from chop.passes.analysis.group_select import (
    dim_sums,
    group_masks,
    group_scores,
    require_granularity,
    structured_selection,
)
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


@pytest.mark.parametrize("chunk", [7, 64, 2**20])  # blocks of 1 row, of several, whole
def test_dim_sums_in_blocks_equal_one_float64_sum_over_the_other_dims(chunk, monkeypatch):
    monkeypatch.setattr(group_select, "_SUM_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    for value in (torch.rand(9, 5, 3, 2, generator=g), torch.rand(13, 6, generator=g) * 1e3,
                  torch.rand(11, generator=g)):
        for dim in range(value.dim()):
            others = [d for d in range(value.dim()) if d != dim]
            expected = value.double().sum(others) if others else value.double()
            got = dim_sums(value, dim)
            assert got.dtype == torch.float64 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


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
        "Exclude it (exclude='...'), use granularity=element, or drop strict=true to skip it")


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
    require_granularity(groups, [query], "channel")  # channel granularity removes whole heads
    dense = "bert.encoder.layer.0.output.dense.weight"  # rows feed the LayerNorm'd stream
    require_granularity(groups, [dense], "channel")  # its input columns are FFN channels
    with pytest.raises(GranularityError, match=rf"granularity=head: layer {dense}"):
        require_granularity(groups, [dense], "head")


# -- structured_selection: a parameter budget, a floor, and what it reports ---------------------


def chain(seed=0):
    """Linear(6, 8) -> ReLU -> Linear(8, 4) -> ReLU -> Linear(4, 3), with random saliency: a
    hidden unit of the first group costs 6 + 4 weights, of the second 8 + 3."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    graph = chop.trace(model, (torch.randn(2, 6),))
    g = torch.Generator().manual_seed(seed)
    for node in graph.weight_nodes():
        node.meta["chop"]["saliency"] = torch.rand(graph.parameter(node).shape, generator=g)
    return graph


NAMES = ["0.weight", "2.weight", "4.weight"]


def removed_params(graph, masks):
    return sum(int((~masks[n]).sum()) for n in NAMES if n in masks)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.8])
def test_global_selection_removes_the_lowest_units_until_the_parameter_budget_is_met(sparsity):
    graph = chain()
    groups = channel_groups(graph)
    selection = structured_selection(graph, NAMES, sparsity, "global", "channel")
    budget = 92 - kept_count(92, sparsity)  # 8·6 + 4·8 + 3·4 weights
    removed = removed_params(graph, selection.masks)
    assert selection.params == (removed, 92) and removed >= budget
    scores = group_scores(graph, groups)
    ranked = sorted(((float(scores[g.id][u]), g.id, u) for g in groups if g.prunable.any()
                     for u in range(g.size)), key=lambda t: t[0])
    chosen = [(gid, u) for gid, keep in selection.keep.items() for u in range(len(keep)) if not keep[u]]
    prefix = [(gid, u) for _, gid, u in ranked[:len(chosen)]]
    assert sorted(chosen) == sorted(prefix)  # the lowest-scoring units (no floor reached here)
    fewer = {gid: torch.ones(groups[gid].size, dtype=torch.bool) for gid in selection.keep}
    for gid, u in prefix[:-1]:
        fewer[gid][u] = False
    assert removed_params(graph, group_masks(graph, groups, fewer)) < budget  # the shortest prefix
    again = structured_selection(chain(), NAMES, sparsity, "global", "channel")
    assert all(torch.equal(again.masks[n], selection.masks[n]) for n in selection.masks)


def test_an_entry_in_a_removed_row_and_a_removed_column_counts_once():
    graph = chain()
    groups = channel_groups(graph)
    first, second = groups.of("0.weight", "out")[0], groups.of("2.weight", "out")[0]
    keep = {first.id: torch.arange(8) != 0, second.id: torch.arange(4) != 0}
    masks = group_masks(graph, groups, keep)
    assert removed_params(graph, masks) == 10 + 11 - 1  # 2.weight[0, 0] is in both
    selection = structured_selection(graph, NAMES, 0.5, "global", "channel")
    assert selection.params[0] == removed_params(graph, selection.masks)


def test_local_scope_gives_each_group_the_budget_of_its_own_parameters():
    graph = chain()
    groups = channel_groups(graph)
    selection = structured_selection(graph, NAMES, 0.5, "local", "channel")
    removed = {gid: int((~k).sum()) for gid, k in selection.keep.items()}
    assert removed == {groups.of("0.weight", "out")[0].id: 4,  # 40 of 80 parameters
                       groups.of("2.weight", "out")[0].id: 2}  # 22 of 44


def test_no_group_is_emptied_and_the_floor_is_reported():
    graph = chain()
    groups = channel_groups(graph)
    selection = structured_selection(graph, NAMES, 0.99, "global", "channel")
    assert {gid: int(k.sum()) for gid, k in selection.keep.items()} == {
        groups.of("0.weight", "out")[0].id: 1, groups.of("2.weight", "out")[0].id: 1}
    assert set(selection.floor) == {"0.bias, 0.weight", "2.bias, 2.weight"}
    assert selection.info()["floor"] == selection.floor
    wider = structured_selection(chain(), NAMES, 0.99, "global", "channel", min_keep=3)
    assert sorted(int(k.sum()) for k in wider.keep.values()) == [3, 3]


def test_layers_a_granularity_cannot_prune_are_skipped_and_reported_or_raise_with_strict():
    _, graph = trace("opaque")
    for node in graph.weight_nodes():
        node.meta["chop"]["saliency"] = torch.rand(graph.parameter(node).shape)
    names = ["conv1.weight", "conv2.weight", "fc.weight"]
    selection = structured_selection(graph, names, 0.5, "global", "channel")
    assert set(selection.unprunable) == {"fc.weight"}  # rows: outputs; columns: conv2's channels
    assert "model output" in selection.unprunable["fc.weight"]
    assert selection.blocked["conv2.weight"]["units"] == 8 and "cumsum" in selection.blocked[
        "conv2.weight"]["reason"]
    assert set(selection.masks) == {"conv1.weight", "conv2.weight"}  # conv1's rows, conv2's columns
    with pytest.raises(GranularityError, match=r"layer fc.weight cannot be pruned this way.*output"):
        structured_selection(graph, names, 0.5, "global", "channel", strict=True)


def wide(scores):
    """Linear(4, 20) -> ReLU -> Linear(20, 2) with saliency making hidden channel i score
    ``scores[i]`` (rows of the first layer only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 2))
    graph = chop.trace(model, (torch.randn(2, 4),))
    nodes = {n.target: n for n in graph.weight_nodes()}
    nodes["0.weight"].meta["chop"]["saliency"] = torch.as_tensor(scores, dtype=torch.float).view(20, 1).expand(20, 4) / 4
    nodes["2.weight"].meta["chop"]["saliency"] = torch.zeros(2, 20)
    return graph


@pytest.mark.parametrize(("round_to", "kept"), [(1, 10), (4, 12), (8, 8), (16, 16), (32, 20)])
def test_round_to_moves_each_groups_kept_count_to_the_nearest_multiple(round_to, kept):
    # 120 weights, 6 per hidden channel: sparsity 0.5 removes 10 of 20 channels; rounding to
    # the nearest multiple (halves up, at least one multiple, at most the group) keeps `kept`,
    # always the highest-scoring ones
    scores = torch.randperm(20, generator=torch.Generator().manual_seed(1)).float()
    graph = wide(scores)
    sel = structured_selection(graph, ["0.weight", "2.weight"], 0.5, round_to=round_to)
    (keep,) = sel.keep.values()
    assert int(keep.sum()) == kept
    assert set(keep.nonzero().flatten().tolist()) == set(scores.argsort(descending=True)[:kept].tolist())
    assert sel.params == (120 - 6 * kept, 120)
    assert int(sel.masks["0.weight"].all(1).sum()) == kept


def test_round_to_rounds_up_where_chop_must_keep_the_units_and_respects_the_floor():
    graph = wide(torch.arange(20.0))
    sel = structured_selection(graph, ["0.weight", "2.weight"], 0.99, round_to=8, min_keep=9)
    assert int(next(iter(sel.keep.values())).sum()) == 16  # floor 9 -> a multiple of 8 above it
    # a unit of c channels counts as c: heads of head_dim 4 round to multiples of 2 heads for 8
    from chop.passes.analysis.group_select import _round_kept

    groups = channel_groups(wide(torch.arange(20.0)))
    g = group_with(groups, "0.weight")
    g.members[0].index = [torch.arange(4 * u, 4 * u + 4) for u in range(g.size)]
    keep = torch.ones(g.size, dtype=torch.bool)
    keep[:13] = False  # 7 kept -> 8 (multiple of 2 units of 4 channels)
    _round_kept(g, keep, torch.arange(20.0), 8, 1)
    assert keep.nonzero().flatten().tolist() == list(range(12, 20))


# -- structured_selection against a plain loop over the units, entry by entry -------------------


class _Residual(nn.Module):
    """Linear(5, 6), then two residual linears: their weights' rows and columns are in one
    group, so a removed unit's row and column of the same weight overlap."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6),
                                          nn.Linear(6, 3))

    def forward(self, x):
        x = self.a(x)
        x = x + self.b(torch.relu(x))
        return self.d(x + self.c(x))


def _unit_loop(graph, names, sparsity, scope, min_keep):
    """The selection as the module doc spells it, one unit at a time: units by (score, group,
    index); each goes unless its group is down to the floor, until the budget is met; global
    scope marks the removed entries of each parameter (an entry counts once), local scope
    gives each group the entries of its own units' slices."""
    groups = channel_groups(graph)
    params = {n: p for n, p in graph.module.named_parameters() if n in names}
    scores = group_scores(graph, groups)
    candidates = [g for g in groups if g.id in scores and bool(g.prunable.any())
                  and any(m.name in params and m.role == "out" for m in g.members)]
    floor = max(min_keep, 1)
    keep, skipped = {}, {}

    def slices(g, u):
        for m in g.members:
            if m.name in params:
                yield m.name, torch.zeros(params[m.name].shape, dtype=torch.bool).index_fill_(
                    m.dim, m.index[u], True)

    def run(gs, budget, gone):
        ranking = sorted((float(scores[g.id][u]), i, u) for i, g in enumerate(gs)
                         for u in range(g.size) if g.prunable[u])
        got = 0
        for _, i, u in ranking:
            if got >= budget:
                break
            g = gs[i]
            kept = keep.setdefault(g.id, torch.ones(g.size, dtype=torch.bool))
            if int(kept.sum()) <= floor:
                label = ", ".join(m.name for m in g.members if m.role == "out")
                skipped[label] = skipped.get(label, 0) + 1
                continue
            kept[u] = False
            for name, entries in slices(g, u):
                got += int((entries & ~gone[name]).sum()) if gone else int(entries.sum())
                if gone:
                    gone[name] |= entries

    total = sum(p.numel() for p in params.values())
    if scope == "global":
        run(candidates, total - kept_count(total, sparsity),
            {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()})
    else:
        for g in candidates:
            size = sum(int(s.sum()) for u in range(g.size) for _, s in slices(g, u))
            run([g], size - kept_count(size, sparsity), None)
    removed = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
    for gid, kept in keep.items():
        for u in (~kept).nonzero().flatten().tolist():
            for name, entries in slices(groups[gid], u):
                removed[name] |= entries
    return keep, skipped, (sum(int(r.sum()) for r in removed.values()), total)


@pytest.mark.parametrize("model", ["chain", "residual", "vgg"])
def test_selection_equals_a_loop_over_the_units_on_tied_scores(model):
    # integer saliency: many tied unit scores, so the tie order (group, then unit) matters
    if model == "chain":
        graph = chain()
    elif model == "residual":
        torch.manual_seed(0)
        graph = chop.trace(_Residual(), (torch.randn(2, 5),))
    else:
        graph = trace("vgg")[1]
    names = [n.target for n in graph.weight_nodes() if graph.parameter(n).dim() > 1]
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        for node in graph.weight_nodes():
            node.meta["chop"]["saliency"] = torch.randint(
                0, 3 - seed, graph.parameter(node).shape, generator=g).float()
        for scope in ("global", "local"):
            for sparsity, min_keep in ((0.2, 0), (0.5, 3), (0.8, 0), (0.99, 2)):
                sel = structured_selection(graph, names, sparsity, scope, min_keep=min_keep)
                keep, floor, params = _unit_loop(graph, names, sparsity, scope, min_keep)
                case = (seed, scope, sparsity, min_keep)
                assert list(sel.keep) == list(keep), case  # groups in the order met
                assert all(torch.equal(sel.keep[gid], k) for gid, k in keep.items()), case
                assert list(sel.floor.items()) == list(floor.items()), case
                assert sel.params == params, case
