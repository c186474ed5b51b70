"""mask: exact kept counts, deterministic ties, masked outputs, training keeps pruned weights at 0."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import chop
from chop.ir import meta
from chop.kernels.select import kept_count
from chop.passes.transform.mask import Mask

PRUNABLE = ["conv1.weight", "conv2.weight", "fc.weight"]


def masks(graph):
    return {n.target: n.meta["chop"]["mask"] for n in graph.weight_nodes() if "mask" in n.meta["chop"]}


def set_saliency(graph, fill):
    for node in graph.weight_nodes():
        meta.entries(node)["saliency"] = fill(graph.parameter(node))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_local_scope_keeps_round_of_each_layer(cnn_graph, cnn_batches, sparsity):
    chop.run(cnn_graph, f"snip, mask{{sparsity={sparsity}, scope=local}}", data=cnn_batches)
    got = masks(cnn_graph)
    assert sorted(got) == PRUNABLE  # linear and conv weights only, by default
    for name, mask in got.items():
        assert int(mask.sum()) == math.floor((1 - sparsity) * mask.numel() + 0.5), name


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.95, 0.999])
def test_global_scope_keeps_round_of_all_and_the_highest_scores(cnn_graph, cnn_batches, sparsity):
    chop.run(cnn_graph, f"snip, mask{{sparsity={sparsity}}}", data=cnn_batches)
    got = masks(cnn_graph)
    total = sum(m.numel() for m in got.values())
    assert sum(int(m.sum()) for m in got.values()) == math.floor((1 - sparsity) * total + 0.5)
    scores = {n.target: n.meta["chop"]["saliency"] for n in cnn_graph.weight_nodes()}
    kept = torch.cat([scores[k][got[k]] for k in got])
    pruned = torch.cat([scores[k][~got[k]] for k in got])
    if kept.numel() and pruned.numel():
        assert kept.min() >= pruned.max()


def test_tied_scores_are_broken_by_position_exactly(cnn_graph):
    set_saliency(cnn_graph, lambda p: torch.zeros_like(p))  # all tied, like dead ReLUs
    chop.run(cnn_graph, "mask{sparsity=0.75}")
    got = masks(cnn_graph)
    total = sum(m.numel() for m in got.values())
    keep = math.floor(0.25 * total + 0.5)
    flat = torch.cat([got[name].flatten() for name in PRUNABLE])  # graph order
    assert flat[:keep].all() and not flat[keep:].any()


def test_few_distinct_scores_keep_exact_counts(cnn_graph):
    g = torch.Generator().manual_seed(0)
    set_saliency(cnn_graph, lambda p: torch.randint(0, 3, p.shape, generator=g).float())
    for sparsity in (0.2, 0.5, 0.8):
        chop.run(cnn_graph, f"mask{{sparsity={sparsity}, scope=local}}")
        for mask in masks(cnn_graph).values():
            assert int(mask.sum()) == kept_count(mask.numel(), sparsity)


def test_masked_graph_equals_the_eager_model_with_pruned_weights_zeroed(cnn, cnn_graph, cnn_batches):
    chop.run(cnn_graph, "snip, mask{sparsity=0.8}", data=cnn_batches)
    reference = copy.deepcopy(cnn).eval()
    with torch.no_grad():
        for name, mask in masks(cnn_graph).items():
            reference.get_parameter(name).mul_(mask)
    cnn_graph.eval()
    x = cnn_batches[1][0]
    torch.testing.assert_close(cnn_graph(x), reference(x))


def test_masks_are_buffers_in_the_state_dict(cnn_graph, cnn_batches):
    chop.run(cnn_graph, "magnitude, mask", data=cnn_batches)
    state = cnn_graph.module.state_dict()
    for name, mask in masks(cnn_graph).items():
        assert state[f"{name}_mask"].dtype == torch.bool
        assert torch.equal(state[f"{name}_mask"], mask)


def test_masking_again_updates_masks_in_place(cnn_graph, cnn_batches):
    chop.run(cnn_graph, "magnitude, mask{sparsity=0.5}, mask{sparsity=0.9}")
    muls = [n for n in cnn_graph.module.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(muls) == len(PRUNABLE)  # no second mul per weight
    buffer = cnn_graph.module.get_buffer("fc.weight_mask")
    assert torch.equal(buffer, masks(cnn_graph)["fc.weight"])
    total = sum(m.numel() for m in masks(cnn_graph).values())
    assert sum(int(m.sum()) for m in masks(cnn_graph).values()) == kept_count(total, 0.9)


def test_optimizer_steps_keep_pruned_weights_at_zero(cnn_graph, cnn_batches):
    chop.run(cnn_graph, "snip, mask{sparsity=0.9}", data=cnn_batches)
    optimizer = torch.optim.Adam(cnn_graph.module.parameters(), lr=0.01, weight_decay=0.1)
    for x, y in cnn_batches * 2:
        optimizer.zero_grad()
        nn.functional.cross_entropy(cnn_graph(x), y).backward()
        for name, mask in masks(cnn_graph).items():
            assert not cnn_graph.parameter(name).grad[~mask].any()  # no gradient through masks
        optimizer.step()
    # the weights the graph computes with (weight * mask) stay zero where pruned
    reference = {name: cnn_graph.parameter(name).detach() * mask for name, mask in masks(cnn_graph).items()}
    cnn_graph.eval()
    x = cnn_batches[0][0]
    out = cnn_graph(x)
    chop.run(cnn_graph, "fold")
    for name, value in reference.items():
        assert torch.equal(cnn_graph.parameter(name), value)
    torch.testing.assert_close(cnn_graph(x), out, rtol=0, atol=0)


def test_include_exclude_and_role_options(cnn_graph, cnn_batches):
    chop.run(cnn_graph, r"magnitude, mask{include='^conv', exclude='conv2'}")
    assert sorted(masks(cnn_graph)) == ["conv1.weight"]
    chop.run(cnn_graph, "mask{biases=true, norms=true, sparsity=0.5}")
    assert {"bn1.weight", "bn1.bias", "conv1.bias", "fc.bias"} <= set(masks(cnn_graph))


def test_embeddings_are_not_pruned_unless_asked():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    graph = chop.trace(model, (torch.randint(0, 10, (2, 3)),))
    chop.run(graph, "magnitude, mask{sparsity=0.5}")
    assert sorted(masks(graph)) == ["2.weight"]
    chop.run(graph, "mask{sparsity=0.5, embeddings=true}")
    assert sorted(masks(graph)) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(chop.OptionError, match=rf"mask: sparsity={sparsity} is out of range; it must be in \[0, 1\)"):
        Mask(sparsity=sparsity)


def test_bad_regex_and_empty_selection(cnn_graph, cnn_batches):
    with pytest.raises(chop.OptionError, match=r"mask: include='\(' is not a valid regex"):
        Mask(include="(")
    with pytest.raises(chop.OptionError, match="mask selected no weights of ResidualCNN.*prunable parameters are: conv1.weight, conv2.weight, fc.weight"):
        chop.run(cnn_graph, "magnitude, mask{include=nothing}")


def test_mask_without_saliency_names_the_passes_that_provide_it(cnn_graph):
    with pytest.raises(chop.MissingMetadataError) as info:
        chop.run(cnn_graph, "mask{sparsity=0.5}")
    message = str(info.value)
    assert "pass 'mask' needs 'saliency'" in message
    assert "Run one of snip, magnitude, random, " in message


def brute_force_counts(scores, budget, lower, upper):
    """Reference for bounded global selection: walk the global ranking (score desc, position
    asc) and stop at the first rank whose clipped per-layer counts sum to the budget."""
    order = sorted(
        ((float(v), layer, i) for layer, s in enumerate(scores) for i, v in enumerate(s.flatten())),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    counts = [0] * len(scores)

    def clipped():
        return [min(max(c, lo), hi) for c, lo, hi in zip(counts, lower, upper)]

    for _, layer, _ in [(None, None, None)] + order:
        if layer is not None:
            counts[layer] += 1
        if sum(clipped()) == budget:
            return clipped()
    raise AssertionError("no rank reaches the budget")


@pytest.mark.parametrize("seed", range(6))
def test_bounded_global_selection_matches_brute_force(seed):
    from chop.passes.transform.mask import layer_counts

    g = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, 5, (n,), generator=g).float() * torch.rand(n, generator=g)
              for n in (40, 7, 90, 15)]
    scores[1] = torch.zeros(7)  # a layer of ties that global selection would empty
    kw = dict(min_sparsity=0.3, max_sparsity=0.8, min_keep=3)
    masks = layer_counts(scores, 0.6, "global", **kw)
    sizes = [s.numel() for s in scores]
    lower = [max(kept_count(n, 0.8), 3) for n in sizes]
    upper = [kept_count(n, 0.3) for n in sizes]
    expected = brute_force_counts(scores, kept_count(sum(sizes), 0.6), lower, upper)
    assert [int(m.sum()) for m in masks] == expected
    for s, m in zip(scores, masks):  # within a layer the highest scores are kept
        if m.any() and (~m).any():
            assert s[m].min() >= s[~m].max()


def test_min_keep_prevents_an_emptied_layer(cnn_graph, cnn_batches, caplog):
    chop.run(cnn_graph, "snip", data=cnn_batches)
    meta.entries(cnn_graph.weight_node("conv1.weight"))["saliency"].zero_()
    chop.run(cnn_graph, "mask{sparsity=0.5}")
    assert not masks(cnn_graph)["conv1.weight"].any()
    assert "mask emptied 1 layer(s): conv1.weight" in caplog.text
    caplog.clear()
    chop.run(cnn_graph, "mask{sparsity=0.5}")  # stays empty: said once, not at every re-mask
    assert not masks(cnn_graph)["conv1.weight"].any() and "mask emptied" not in caplog.text
    chop.run(cnn_graph, "mask{sparsity=0.5, min_keep=10}")
    got = masks(cnn_graph)
    assert int(got["conv1.weight"].sum()) == 10
    assert sum(int(m.sum()) for m in got.values()) == kept_count(sum(m.numel() for m in got.values()), 0.5)


def test_n_m_keeps_n_of_every_m_along_the_input_dimension(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip, mask{granularity='2:4'}", data=mlp_batches)
    for node in graph.weight_nodes():
        if "mask" not in node.meta["chop"]:
            continue
        mask = node.meta["chop"]["mask"]
        score = node.meta["chop"]["saliency"]
        groups, group_scores = mask.reshape(-1, 4), score.reshape(-1, 4)
        assert (groups.sum(1) == 2).all()
        kept_min = torch.where(groups, group_scores, torch.inf).min(1).values
        pruned_max = torch.where(groups, -torch.inf, group_scores).max(1).values
        assert (kept_min >= pruned_max).all()


def test_n_m_on_gpt2_style_weights_uses_the_input_dimension():
    class Conv1D(nn.Module):  # x @ W + b with W [in, out], like Hugging Face's Conv1D
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3))
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    graph = chop.trace(Conv1D(), (torch.randn(2, 8),))
    chop.run(graph, "magnitude, mask{granularity='1:4'}")
    mask = masks(graph)["weight"]  # [in=8, out=3]: groups of 4 run down each column
    assert (mask.t().reshape(-1, 4).sum(1) == 1).all()


def test_block_granularity_keeps_whole_blocks(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip, mask{granularity='4x4', sparsity=0.75, scope=local}", data=mlp_batches)
    for name, mask in masks(graph).items():
        blocks = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1] // 4, 4).permute(0, 2, 1, 3).flatten(2)
        assert ((blocks.sum(-1) == 0) | (blocks.sum(-1) == 16)).all(), name
        assert int(blocks.all(-1).sum()) == kept_count(blocks.shape[0] * blocks.shape[1], 0.75)


def test_pattern_errors_name_the_layer(cnn_graph, cnn_batches):
    with pytest.raises(chop.OptionError, match=r"granularity 2:4 needs the input dimension of conv1.weight \(27\) to be a multiple of 4"):
        chop.run(cnn_graph.copy(), "magnitude, mask{granularity='2:4', strict=true}")
    with pytest.raises(chop.OptionError, match=r"granularity 4x4 needs conv1.weight, seen as a 8x27 matrix"):
        chop.run(cnn_graph, "magnitude, mask{granularity='4x4'}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("granularity='2:4', sparsity=0.9", "granularity 2:4 fixes the sparsity at 0.5; remove sparsity=0.9"),
        ("granularity=rows", "granularity='rows' is not one of: element, channel, head, RxC blocks"),
        ("granularity='5:4'", "granularity 5:4 needs 0 < N <= M"),
        ("min_sparsity=0.8, max_sparsity=0.5", "min_sparsity=0.8 is above max_sparsity=0.5"),
        ("max_sparsity=1.5", r"max_sparsity=1.5 must be in \[0, 1\]"),
        ("min_keep=-1", "min_keep=-1 must be 0 or more"),
        ("granularity=channel, max_sparsity=0.3", "max_sparsity bound.*granularity=channel "
         "removes whole channel groups.*remove max_sparsity"),
        ("granularity=head, min_sparsity=0.1, max_sparsity=0.8", "min_sparsity and max_sparsity"),
    ],
)
def test_pattern_option_errors(options, message):
    with pytest.raises(chop.OptionError, match=message):
        chop.parse_pipeline(f"mask{{{options}}}")


@pytest.mark.parametrize(("name", "granularity"), [("vgg", "channel"), ("resnet", "channel"), ("bert", "head")])
def test_structured_masks_remove_whole_groups_and_shrink_cuts_them(name, granularity, caplog):
    import zoo
    from chop.passes.analysis.channel_groups import stored_channel_groups

    model, graph = zoo.trace(name)
    args, kwargs = zoo.ZOO[name].inputs(5)
    chop.run(graph, f"random{{seed=1}}, mask{{granularity={granularity}, sparsity=0.5, scope=local}}")
    removed = graph.history[-1].info["removed"]
    share = removed["params"] / removed["of"]  # layers between two pruned groups lose more
    assert (f"scope=local removed {100 * share:.1f}% of the pruned layers' parameters"
            in caplog.text) == (share > 0.52)
    groups = stored_channel_groups(graph)
    chosen = [g for g in groups if g.kind == granularity and bool(g.prunable.any())]
    assert chosen
    selected = {n.target for n in graph.weight_nodes() if n.meta["chop"]["role"] in ("linear", "conv")}
    params = dict(graph.module.named_parameters())
    for group in chosen:  # each unit is kept in every producing layer or removed from all
        out = [m for m in group.members if m.role == "out" and m.name in masks(graph)]
        removed = 0
        for unit in range(group.size):
            kept = {bool(masks(graph)[m.name].index_select(m.dim, m.index[unit]).any()) for m in out}
            assert len(kept) == 1
            removed += not kept.pop()
        # local scope: the group's own parameters in the selected layers, half of them removed
        # by the fewest units (every unit of these groups costs the same)
        cost = sum(len(m.index[0]) * params[m.name].numel() // params[m.name].shape[m.dim]
                   for m in group.members if m.name in selected)
        budget = group.size * cost - kept_count(group.size * cost, 0.5)
        assert removed * cost >= budget > (removed - 1) * cost, group.layers("out")
    before = zoo.output(graph(*args, **kwargs))
    params = sum(p.numel() for p in graph.module.parameters())
    chop.run(graph, "shrink")
    torch.testing.assert_close(zoo.output(graph(*args, **kwargs)), before, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in graph.module.parameters()) < params


def test_head_granularity_on_a_cnn_names_the_layer(cnn_graph):
    with pytest.raises(chop.OptionError, match="granularity=head: the model has no attention "
                                               "heads.*; layer conv1.weight is in no attention head"):
        chop.run(cnn_graph, "magnitude, mask{granularity=head}")


class OutputHeads(nn.Module):
    """Attention whose heads are the model's output: it has heads, none of which may go."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_a_structured_mask_that_can_remove_nothing_says_why():
    graph = chop.trace(OutputHeads(), (torch.randn(2, 5, 8),))
    with pytest.raises(chop.PassError, match=r"mask\{granularity=head\}: no weight of OutputHeads "
                       r"can be pruned at this granularity.*qkv.weight: .*reaches the model output"):
        chop.run(graph, "magnitude, mask{granularity=head, sparsity=0.5}")
    assert not [n for n in graph.weight_nodes() if "mask" in n.meta["chop"]]
    with pytest.raises(chop.PassError, match=r"mask\{granularity=channel\}: .*Use "
                                             r"granularity=element, or prune another model$"):
        chop.run(graph, "magnitude, mask{granularity=channel, sparsity=0.5}")


class ResidualThenMLP(nn.Module):
    """A layer whose output meets the model's input (its channels cannot go), then two that can
    lose channels."""

    def __init__(self):
        super().__init__()
        self.res, self.l2, self.l3 = nn.Linear(10, 10), nn.Linear(10, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(x + self.res(x))))


@pytest.mark.parametrize("sparsity", [0.0, 0.001])
def test_a_structured_budget_that_removes_nothing_is_not_called_unprunable(sparsity):
    """A budget under one channel removes nothing; that is not "no weight can be pruned" when a
    selected layer cannot be, as a larger budget shows."""
    graph = chop.trace(ResidualThenMLP(), (torch.randn(4, 10),))
    chop.run(graph, f"magnitude, mask{{granularity=channel, sparsity={sparsity}}}")
    info = graph.history[-1].info
    assert info["kept"] == {} and list(info["unprunable"]) == ["res.weight"]
    assert info["removed"] == {"params": 0, "of": 16 * 10 + 4 * 16, "units": 0}  # the weights
    chop.run(graph, "mask{granularity=channel, sparsity=0.5}")
    assert set(graph.history[-1].info["kept"]) == {"l2.weight", "l3.weight"}


def sharded_layer_counts(rank, world, scores, splits, configs):
    """layer_counts over this rank's pieces of ``scores`` (row or column ranges, or copies),
    for each (sparsity, scope, bounds) of ``configs``; returns the masks and the boxes."""
    from chop.kernels import distributed
    from chop.kernels.select import Piece
    from chop.passes.transform.mask import layer_counts

    pieces, boxes = [], []
    for s, how in zip(scores, splits):
        box = [slice(0, n) for n in s.shape]
        if how != "copy":
            dim = 0 if how == "rows" else 1
            size = -(-s.shape[dim] // world)
            box[dim] = slice(min(rank * size, s.shape[dim]), min((rank + 1) * size, s.shape[dim]))
        boxes.append(tuple(box))
        pieces.append(Piece(s[tuple(box)].clone(), tuple(s.shape), tuple(b.start for b in box),
                            counted=how != "copy" or rank == 0))
    reduce = distributed.count_reducer("test")
    return [layer_counts(pieces, sparsity, scope, **bounds, reduce=reduce)
            for sparsity, scope, bounds in configs], boxes


def test_layer_counts_over_sharded_layers_equal_one_process(ranks):
    from chop.passes.transform.mask import layer_counts

    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 4, (9, 8), generator=g).float(),  # ties across the ranks
              torch.zeros(3, 5),  # a layer of ties that global selection would empty
              torch.randint(0, 3, (12, 6), generator=g).float() * torch.rand(12, 6, generator=g),
              torch.rand(7, generator=g)]
    splits = ["cols", "rows", "cols", "copy"]
    configs = [(0.6, "global", {}), (0.6, "local", {}), (0.9, "local", {"min_keep": 4}),
               (0.6, "global", {"min_sparsity": 0.3, "max_sparsity": 0.8, "min_keep": 3}),
               (0.95, "global", {"min_keep": 2}), (0.2, "global", {"min_sparsity": 0.5})]
    results = ranks.run(sharded_layer_counts, scores, splits, configs)
    for c, (sparsity, scope, bounds) in enumerate(configs):
        expected = layer_counts(scores, sparsity, scope, **bounds)
        whole = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
        seen = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
        for per_config, boxes in results:
            for w, s, mask, box in zip(whole, seen, per_config[c], boxes):
                assert not s[box].any() or torch.equal(w[box], mask)  # copies agree
                w[box], s[box] = mask, True
        assert all(torch.equal(a, b) for a, b in zip(whole, expected)), configs[c]


def test_inconsistent_counts_over_processes_fail_instead_of_looping():
    from chop.errors import InternalError
    from chop.passes.transform.mask import layer_counts

    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(40, generator=g), torch.rand(7, generator=g) * 0.01]
    with pytest.raises(InternalError, match="kept 20 units for a budget of 19"):
        layer_counts(scores, 0.5, "global", min_keep=5, reduce=lambda t: t * 2)  # counted twice


def test_n_m_groups_a_transposed_conv_along_its_input_dim():
    """A ConvTranspose weight is stored [in, out, *kernel]: it was grouped along out·kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4))
    graph = chop.run(chop.trace(model, (torch.randn(2, 8, 4, 4),)),
                     "magnitude, mask{granularity='2:4'}")
    mask = graph.weight_node("0.weight").meta["chop"]["mask"]
    assert mask.shape == (8, 4, 1, 1)
    rows = mask.transpose(0, 1).reshape(4, 8)  # [out, in·kh·kw], as a conv's
    assert (rows.reshape(-1, 4).sum(1) == 2).all()


def test_n_m_refuses_bounds_it_cannot_honour():
    """They were accepted and ignored: every layer ends at N/M whatever they say."""
    for named, value in (("max_sparsity", 0.25), ("min_sparsity", 0.9), ("min_keep", 20)):
        with pytest.raises(chop.OptionError, match=f"keeps 2 of every 4 weights in each layer, "
                                                   f"whatever its scores, so {named} would change"):
            Mask(granularity="2:4", **{named: value})
    Mask(granularity="2:4", max_sparsity=1.0, min_keep=0)  # the defaults


# -- what structured and N:M selection skip, and report ------------------------------------------


def test_channel_granularity_prunes_what_it_can_and_reports_the_rest_per_layer():
    import zoo

    _, graph = zoo.trace("opaque")
    chop.run(graph, "random{seed=0}, mask{granularity=channel, sparsity=0.3}")
    info = graph.history[-1].info
    assert set(info["unprunable"]) == {"fc.weight"} and "model output" in info["unprunable"]["fc.weight"]
    assert info["blocked"]["conv2.weight"] == {
        "units": 8, "of": 8, "kind": "channel",
        "reason": "cumsum (aten.cumsum.default): this op is not understood by channel-groups"}
    removed, of = info["removed"]["params"], info["removed"]["of"]
    assert of == 8 * 27 + 8 * 8 and removed >= of - kept_count(of, 0.3)
    assert set(info["kept"]) == {"conv1.weight", "conv2.weight"}
    with pytest.raises(chop.OptionError, match="granularity=channel: layer fc.weight cannot be pruned"):
        chop.run(graph.copy(), "mask{granularity=channel, sparsity=0.3, strict=true}")


def test_n_m_skips_and_reports_layers_whose_input_size_does_not_fit(cnn_graph):
    chop.run(cnn_graph, "magnitude, mask{granularity='2:4'}")
    info = cnn_graph.history[-1].info
    assert info["unprunable"] == {"conv1.weight": "its input size 27 is not a multiple of 4"}
    assert set(info["kept"]) == {"conv2.weight", "fc.weight"}
    for name, (kept, numel) in info["kept"].items():
        assert kept * 2 == numel, name


# -- recurrent layers --------------------------------------------------------------------------


RECURRENT = [f"lstm.weight_{kind}_l{layer}{suffix}" for layer in (0, 1) for suffix in ("", "_reverse")
             for kind in ("ih", "hh")] + ["gru.weight_ih_l0", "gru.weight_hh_l0"]


def recurrent():
    import zoo

    torch.manual_seed(0)
    model = zoo.Recurrent()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 120, (4, 7), generator=g), torch.randint(0, 4, (4,), generator=g))
               for _ in range(2)]
    return model, chop.trace(model, (batches[0][0],)), batches


def test_snip_scores_recurrent_weights_as_the_gradient_of_their_mask():
    model, graph, batches = recurrent()
    chop.run(graph, "snip{batches=2}", data=batches)
    params = dict(model.named_parameters())
    ones = {name: torch.ones_like(params[name], requires_grad=True) for name in RECURRENT}
    total = {name: torch.zeros_like(params[name]) for name in RECURRENT}
    model.eval()  # scoring runs dropout off
    for x, y in batches:
        masked = {**{k: v.detach() for k, v in params.items()},
                  **{name: params[name].detach() * ones[name] for name in RECURRENT}}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, masked, (x,)), y)
        for name, grad in zip(RECURRENT, torch.autograd.grad(loss, [ones[n] for n in RECURRENT])):
            total[name] += grad
    for name in RECURRENT:  # |Σ_b ∂L_b/∂m| at m = 1
        torch.testing.assert_close(graph.weight_node(name).meta["chop"]["saliency"], total[name].abs())


@pytest.mark.parametrize("criterion", ["magnitude", "random", "synflow{dtype=model}", "grasp", "snip"])
def test_every_criterion_scores_recurrent_weights_and_mask_fold_are_exact(criterion):
    model, graph, batches = recurrent()
    chop.run(graph, f"{criterion}, mask{{sparsity=0.6}}", data=batches)
    got = masks(graph)
    assert set(RECURRENT) <= set(got) and "embed.weight" not in got
    for name in RECURRENT:
        assert graph.weight_node(name).meta["chop"]["saliency"].shape == model.get_parameter(name).shape
    graph.eval()
    x = torch.randint(0, 120, (5, 7))
    eager = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, mask in got.items():
            eager.get_parameter(name).mul_(mask)
        masked = graph(x)
        torch.testing.assert_close(masked, eager(x))
        chop.run(graph, "fold")
        torch.testing.assert_close(graph(x), masked, rtol=0, atol=0)


def test_include_naming_a_weight_chop_cannot_select_is_an_error():
    import zoo

    _, graph, _ = recurrent()
    set_saliency(graph, torch.rand_like)
    with pytest.raises(chop.OptionError, match=r"include='embed.weight' names embed.weight \(a "
                                               r"embedding weight\).*set embeddings=true"):
        chop.run(graph, "mask{include='embed.weight'}")
    with pytest.raises(chop.OptionError, match="mask selected no weights"):
        chop.run(graph, "mask{include='lstm.bias'}")  # matches biases only, names none
    chop.run(graph, "mask{include='lstm.weight_hh_l0$'}")  # a recurrent weight is selectable
    assert set(masks(graph)) == {"lstm.weight_hh_l0"}
    _, convnext = zoo.trace("convnext")  # a layer scale: a parameter no known op uses as a weight
    set_saliency(convnext, torch.rand_like)
    with pytest.raises(chop.OptionError, match=r"names scale \(a other weight\).*does not know how"):
        chop.run(convnext, "mask{include='scale'}")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("granularity=channel, round_to=0", "round_to=0 must be an integer >= 1"),
        ("granularity=channel, round_to=2.5", r"round_to=2.5 is not valid; expected int"),
        ("round_to=8", ("round_to=8 rounds the kept channels of channel groups, so it needs "
                        "granularity=channel or head, not element; set granularity=channel")),
        ("granularity='2:4', round_to=8", "needs granularity=channel or head, not 2:4"),
    ],
)
def test_round_to_option_errors(options, message):
    with pytest.raises(chop.OptionError, match=message):
        chop.parse_pipeline(f"mask{{{options}}}")


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_keeps_multiples_in_every_group_and_shrink_equals_the_masked_graph(round_to):
    import zoo
    from chop.passes.analysis.channel_groups import stored_channel_groups

    _, graph = zoo.trace("resnet")
    x = torch.randn(3, 3, 16, 16)
    data = [((x,), torch.zeros(3, dtype=torch.long))]
    chop.run(graph, f"snip, mask{{granularity=channel, sparsity=0.6, round_to={round_to}}}", data=data)
    groups = stored_channel_groups(graph)
    masks_by_name = masks(graph)
    pruned = 0
    for g in groups:
        out = [m for m in g.members if m.role == "out" and m.name in masks_by_name]
        if not out or not bool(g.prunable.any()):
            continue
        mask = masks_by_name[out[0].name]
        kept = sum(bool(mask.index_select(out[0].dim, i).any()) for i in out[0].index)
        assert kept % round_to == 0 or kept == g.size, (g.layers("out"), kept)
        pruned += kept < g.size
    assert pruned  # something was removed
    with torch.no_grad():
        masked = graph.module(x)
    shrunk = graph.copy()
    chop.run(shrunk, "shrink", data=data)
    with torch.no_grad():
        torch.testing.assert_close(shrunk.module(x), masked, rtol=1e-4, atol=1e-4)
    for g in groups:
        for m in g.members:
            if m.role == "out" and m.name in masks_by_name and bool(g.prunable.any()):
                size = shrunk.module.get_parameter(m.name).shape[m.dim]
                assert size % round_to == 0 or size == g.size, (m.name, size)


def test_sparsities_are_rounded_as_the_decimals_they_are_written_as():
    """In floats 1 − 0.9995 is a hair under 0.0005: kept_count(1000, 0.9995) rounded the half
    entry down to 0, emptying the layer, and (1 − 0.1285)·1000 = 871.5 went to 871."""
    assert kept_count(1000, 0.9995) == 1 and kept_count(1000, 0.1285) == 872
    assert [kept_count(10, s) for s in (0.0, 0.25, 0.35, 0.5, 1.0)] == [10, 8, 7, 5, 0]
    assert kept_count(3, 1 / 3) == 2 and kept_count(10**12, 0.9) == 10**11


def test_mask_after_sparse_is_refused(mlp, mlp_batches):
    """After sparse, the CSR layers are no weights mask sees: a global budget fell on the
    dense layers alone (95% asked, 90.8% given)."""
    graph = chop.trace(mlp, (mlp_batches[0][0][:2],))
    chop.run(graph, "snip, mask{sparsity=0.9}, sparse{mode=all}", data=mlp_batches)
    with pytest.raises(chop.PassError, match="put mask before sparse"):
        chop.run(graph, "snip, mask{sparsity=0.95}", data=mlp_batches)


PIPELINES = {"element": "mask{sparsity=0.5}", "2:4": "mask{granularity=2:4}",
             "2x1": "mask{granularity=2x1, sparsity=0.5}",
             "channel": "channel-groups, mask{granularity=channel, sparsity=0.5}"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e5m2])
@pytest.mark.parametrize("granularity", ["element", "channel", "2:4"])
def test_nan_scores_are_a_data_error_naming_the_layer(cnn_graph, granularity, dtype):
    """NaN saliency (a NaN in the data) was an InternalError ("a bug in chop") on the element
    path, and the channel and N:M paths built masks from NaN's place in a sort."""
    for node in cnn_graph.weight_nodes():
        weight = cnn_graph.parameter(node)
        meta.entries(node)["saliency"] = torch.rand(weight.shape)
    meta.entries(cnn_graph.weight_node("conv2.weight"))["saliency"][0, 0, 0, 0] = math.nan
    for node in cnn_graph.weight_nodes():
        meta.entries(node)["saliency"] = meta.entries(node)["saliency"].to(dtype)
    with pytest.raises(chop.DataError, match="the saliency of conv2.weight holds NaN"):
        chop.run(cnn_graph, PIPELINES[granularity])


@pytest.mark.parametrize("granularity", list(PIPELINES))
def test_float8_scores_mask_as_the_float32_values_they_hold(cnn_graph, granularity):
    """torch sorts, sums and takes amax of no one-byte float: such scores (from a criterion run
    in float8) rank as their values upcast, exactly, where they failed as a bug in chop."""
    got = {}
    for dtype in (torch.float8_e4m3fn, torch.float32):
        graph = cnn_graph.copy()
        generator = torch.Generator().manual_seed(0)
        for node in graph.weight_nodes():
            score = torch.rand(graph.parameter(node).shape, generator=generator)
            meta.entries(node)["saliency"] = score.to(torch.float8_e4m3fn).to(dtype)
        chop.run(graph, PIPELINES[granularity])
        got[dtype] = masks(graph)
    assert got[torch.float32] and got[torch.float8_e4m3fn].keys() == got[torch.float32].keys()
    for name, mask in got[torch.float32].items():
        assert torch.equal(got[torch.float8_e4m3fn][name], mask), name


class Transposed(nn.Module):
    """Falcon's linears (x @ wᵀ written out) and a Mixture-of-Experts layer's experts
    ([experts, out, in], each token through its expert's wᵀ)."""

    def __init__(self, transpose):
        super().__init__()
        self.transpose = transpose
        self.w = nn.Parameter(torch.randn(4, 8))
        self.experts = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x):
        h = x @ self.transpose(self.w)
        return torch.bmm(h.expand(2, -1, -1), self.experts.transpose(1, 2))


@pytest.mark.parametrize("transpose", [lambda w: w.T, lambda w: w.t(), lambda w: w.mT,
                                       lambda w: w.permute(1, 0)])
def test_weights_seen_transposed_by_a_product_are_linear_weights(transpose):
    """They were no layer's weights (Falcon could not be pruned; MoE experts were skipped)."""
    graph = chop.trace(Transposed(transpose), torch.randn(5, 8))
    assert {n.target: n.meta["chop"]["role"] for n in graph.weight_nodes()} == {
        "w": "linear", "experts": "linear"}
    chop.run(graph, "magnitude, mask{granularity='2:4'}")
    for name, size in (("w", 8), ("experts", 4)):  # 2 of every 4 along the input dim (the last)
        mask = graph.weight_node(name).meta["chop"]["mask"]
        assert torch.equal(mask.reshape(-1, 4).sum(1), torch.full((mask.numel() // 4,), 2))
        rows = graph.parameter(name).detach().abs().reshape(-1, 4)
        assert torch.equal(mask.reshape(-1, 4), rows >= rows.sort(1).values[:, 2:3])


class InOut(nn.Module):
    """x @ W with W stored [in, out], 2-D and batched ([experts, in, out])."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.experts = nn.Parameter(torch.randn(2, 4, 3))

    def forward(self, x):
        return torch.matmul((x @ self.w).expand(2, -1, -1), self.experts)


def test_n_m_of_an_in_out_weight_runs_along_its_input_dim():
    """2:4 of a weight x @ W read it as [out, in] (only addmm's was transposed)."""
    graph = chop.trace(InOut(), torch.randn(5, 8))
    chop.run(graph, "magnitude, mask{granularity='2:4'}")
    for name in ("w", "experts"):  # 2 of every 4 along dim -2, the input dim
        mask = graph.weight_node(name).meta["chop"]["mask"].transpose(-1, -2).reshape(-1, 4)
        rows = graph.parameter(name).detach().abs().transpose(-1, -2).reshape(-1, 4)
        assert torch.equal(mask, rows >= rows.sort(1).values[:, 2:3]), name


def test_a_model_without_recognised_layers_says_which_ops_use_its_weights():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x * self.w

    graph = chop.trace(Scaled(), torch.randn(2, 6))
    chop.run(graph, "magnitude")
    with pytest.raises(chop.PassError, match=r"no weight chop recognises as a linear or conv "
                                             r"layer's .* used by: mul"):
        chop.run(graph, "mask{sparsity=0.5}")


def test_round_to_that_keeps_whole_groups_is_warned_about(caplog):
    # groups of 16 channels with round_to=16 keep all 16: nothing is removed, and raising the
    # sparsity cannot help
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    x = torch.randn(4, 3, 8, 8)
    data = [(x, torch.randint(0, 4, (4,)))]
    graph = chop.trace(model, (x,))
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(graph, "snip, mask{granularity=channel, sparsity=0.5, round_to=16}", data=data)
    assert graph.history[-1].info["removed"]["params"] == 0
    assert [m for m in caplog.messages if "round_to" in m] == [
        "mask: round_to=16 removed 0.0% of the pruned layers' parameters (sparsity=0.5): each "
        "channel group keeps a multiple of 16 channels, at least 16, so a group of 16 channels "
        "or fewer keeps them all; lower round_to (or leave it out)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="chop"):  # round_to=8 halves them: nothing to say
        chop.run(chop.trace(model, (x,)), "snip, mask{granularity=channel, sparsity=0.5, "
                                          "round_to=8}", data=data)
    assert not [m for m in caplog.messages if "round_to" in m]


class SplitByIndex(nn.Module):
    """A fused query-key-value projection under grouped-query attention, split by indexing
    (``qkv[:, :, :, [-2]]``), as Falcon's attention was written before transformers 5.25."""

    def __init__(self, heads: int = 4, kv: int = 2, dim: int = 8):
        super().__init__()
        self.heads, self.kv, self.dim = heads, kv, dim
        self.qkv = nn.Linear(heads * dim, (heads + 2 * kv) * dim)
        self.out = nn.Linear(heads * dim, heads * dim)

    def forward(self, x):
        b, s, _ = x.shape
        group = self.heads // self.kv
        qkv = self.qkv(x).view(b, s, self.kv, group + 2, self.dim)
        q = qkv[:, :, :, :-2].reshape(b, s, self.heads, self.dim).transpose(1, 2)
        k, v = (qkv[:, :, :, [i]].expand(b, s, self.kv, group, self.dim)
                .reshape(b, s, self.heads, self.dim).transpose(1, 2) for i in (-2, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


def test_head_granularity_names_what_stopped_the_attention_projections():
    """Falcon's fused query_key_value, split by indexing: the error gave a fixed text (one
    about multi-query attention) and not the reason."""
    torch.manual_seed(0)
    graph = chop.trace(SplitByIndex(), (torch.randn(2, 5, 32),))
    with pytest.raises(chop.OptionError, match=r"; at qkv\.weight: index(_\d+)? \(aten\.index"
                                               r"\.Tensor\): indexes after a full slice"):
        chop.run(graph, "magnitude, mask{granularity=head}")


def test_a_layer_channel_groups_do_not_follow_is_named_by_its_op():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(), nn.Conv2d(4, 2, 1))
    graph = chop.trace(model, (torch.randn(2, 3, 8, 8),))
    with pytest.raises(chop.PassError, match=r"2\.weight: it is in no channel group \(its weight "
                                             r"is used by conv_transpose2d; channels are removed "
                                             r"from linear, addmm, conv and x @ wᵀ layers\)"):
        chop.run(graph, "magnitude, mask{granularity=channel, sparsity=0.5}")
