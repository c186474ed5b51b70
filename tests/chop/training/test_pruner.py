"""Pruner: exact kept counts at every pruning step of its schedule; progressive pruning never
returns a weight; pattern-lock keeps masks; plain modules and chop graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import chop
from chop.errors import DataError, OptionError
from chop.ir import meta
from chop.training.pruner import Pruner


def kept(n: int, s: float) -> int:
    return math.floor((1 - s) * n + 0.5)


def train(pruner: Pruner, module: torch.nn.Module, batches, steps: int | range, *,
          momentum: float = 0.9, begin: bool = True, optimizer=None,
          snapshots: list | None = None) -> list[int]:
    """A plain training loop calling the hooks (``on_train_begin`` unless not ``begin``) for
    ``steps`` (a count, or the steps' numbers), with ``optimizer`` (default: SGD with
    ``momentum``); returns the total kept count after each step and appends a copy of the
    masks after each step to ``snapshots``."""
    if optimizer is None:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=momentum)
    if begin:
        pruner.on_train_begin()
    counts = []
    for step in range(steps) if isinstance(steps, int) else steps:
        x, y = batches[step % len(batches)]
        pruner.on_step_begin(step, (x, y))
        F.cross_entropy(module(x), y).backward()
        pruner.on_before_optimizer_step()
        optimizer.step()
        pruner.on_after_optimizer_step()
        optimizer.zero_grad()
        counts.append(sum(int(m.sum()) for m in pruner.masks.values()))
        if snapshots is not None:
            snapshots.append({k: v.clone() for k, v in pruner.masks.items()})
    return counts


@pytest.mark.parametrize("kind", ["module", "graph"])
@pytest.mark.parametrize("curve", ["cube", "exp"])
def test_pruner_exact_counts_at_every_pruning_step(mlp, mlp_batches, kind, curve):
    target = 0.9
    graph = chop.trace(mlp, (mlp_batches[0][0],)) if kind == "graph" else None
    model = graph if graph is not None else mlp
    module = graph.module if graph is not None else mlp
    pruner = Pruner(model, target, criterion="snip", schedule=curve, start_step=1, end_step=7,
                    frequency=2, initial_sparsity=0.3, data=mlp_batches[:1])
    counts = train(pruner, module, mlp_batches, 10)
    total = sum(p.numel() for n, p in mlp.named_parameters() if n.endswith("weight"))
    schedule = pruner.schedule
    assert counts[0] == 0  # no mask before start_step
    for step, count in enumerate(counts[1:], start=1):
        assert count == kept(total, schedule.sparsity_at(step)), step
    assert [h["step"] for h in pruner.history] == [1, 3, 5, 7]
    assert pruner.history[-1]["kept"] == kept(total, target)
    # the graph's history holds the last pruning step's passes only (not 2 per step, unbounded)
    assert [r.name for r in pruner.graph.history] == ["snip", "mask"]
    assert pruner.graph.history[-1].info["kept"] == {
        name: (int(m.sum()), m.numel()) for name, m in pruner.masks.items()}
    masks = pruner.masks
    for name, mask in masks.items():  # the weights really are zero where pruned, after training
        weight = (graph.parameter(name) * graph.module.get_buffer(name.replace(".weight", ".weight_mask"))
                  if graph is not None else mlp.get_parameter(name))
        assert torch.count_nonzero(weight[~mask]) == 0
    names = list(masks)
    assert names == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]


def test_progressive_pruning_never_returns_a_weight(mlp, mlp_batches):
    pruner = Pruner(mlp, 0.95, criterion="magnitude", schedule="linear", start_step=0,
                    end_step=4, frequency=1, initial_sparsity=0.5, example_inputs=mlp_batches[0][0])
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.5)
    previous = None
    for step in range(5):
        x, y = mlp_batches[step % 3]
        pruner.on_step_begin(step)
        F.cross_entropy(mlp(x), y).backward()
        pruner.on_before_optimizer_step()
        optimizer.step()
        pruner.on_after_optimizer_step()
        optimizer.zero_grad()
        masks = pruner.masks
        if previous is not None:
            assert all(not (masks[k] & ~previous[k]).any() for k in masks)
        previous = {k: v.clone() for k, v in masks.items()}


@pytest.mark.parametrize("read", ["masks", "prune"])
def test_masks_read_at_a_step_stay_as_they_were(mlp, mlp_batches, read, tmp_path):
    """The masks :attr:`Pruner.masks` and :meth:`Pruner.prune` give are the step's own: later
    steps (which update the Pruner's held masks in place) leave them as they were, and each
    mask has a storage of its own (safetensors saves them side by side)."""
    from safetensors.torch import save_file

    pruner = Pruner(mlp, 0.95, criterion="magnitude", schedule="linear", start_step=0,
                    end_step=4, frequency=1, example_inputs=mlp_batches[0][0])
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.5)
    held, copies = [], []
    for step in range(5):
        train(pruner, mlp, mlp_batches, range(step, step + 1), optimizer=optimizer,
              begin=step == 0)
        masks = pruner.masks if read == "masks" else pruner.prune(0.5 + 0.1 * step)
        held.append(masks)
        copies.append({k: v.clone() for k, v in masks.items()})
    assert len({sum(int(m.sum()) for m in c.values()) for c in copies}) == 5
    for masks, copy in zip(held, copies):
        assert masks.keys() == copy.keys()
        assert all(torch.equal(masks[k], copy[k]) for k in masks)
    assert len({m.untyped_storage().data_ptr() for m in held[-1].values()}) == 3
    save_file(held[-1], tmp_path / "masks.safetensors")


@pytest.mark.parametrize("options", [{}, {"scope": "local"}, {"max_sparsity": 0.97}])
def test_plain_ranking_first_gives_the_masks_of_ranking_pruned_weights_last(
        mlp, mlp_batches, monkeypatch, options):
    """The Pruner ranks without rewriting the scores first, and rewrites (pruned weights
    last) only where a pruned weight would come back: stale scores above the threshold, or
    ties at 0 in front of kept weights. The masks equal those of always rewriting, at every
    step, and the rewrite runs only where needed (always with per-layer bounds)."""
    from chop.training import pruner as pruner_module

    g = torch.Generator().manual_seed(5)
    drawn: dict[tuple[str, float], torch.Tensor] = {}  # the same draws for both runs
    # per step: scores of the masked weights (pruned ones 0, as magnitude's), stale scores
    # (pruned ones may be high), masked scores of 0 and 1 that tie at the threshold 0, or
    # masked negative scores (GraSP's can be), all below the pruned weights' 0
    kinds = {0.3: "masked", 0.5: "masked", 0.6: "stale", 0.7: "ties", 0.75: "signed",
             0.8: "masked"}

    def steps(always_rewrite: bool) -> tuple[list[dict[str, torch.Tensor]], int]:
        graph = chop.trace(mlp, (mlp_batches[0][0],))
        pruner = Pruner(graph, 0.9, criterion="random", mask_options=options)
        rewrites, real = [], pruner_module.pruned_last

        def counting(graph, *granularity):
            rewrites.append(1)
            return real(graph, *granularity)

        monkeypatch.setattr(pruner_module, "pruned_last", counting)
        if always_rewrite:
            def rewrite(self, graph, step_mask, batch):
                with counting(graph):
                    self._run(graph, step_mask, batch)

            monkeypatch.setattr(Pruner, "_select", rewrite)
        history = []
        for sparsity, kind in kinds.items():
            for node in graph.weight_nodes():
                if node.target.endswith("weight"):
                    key = (node.target, sparsity)
                    if key not in drawn:
                        drawn[key] = torch.rand(graph.parameter(node).shape, generator=g)
                    score = {"ties": drawn[key].round(),
                             "signed": drawn[key] - 2.0}.get(kind, drawn[key])
                    mask = meta.entries(node).get("mask")
                    if kind != "stale" and mask is not None:
                        score = score * mask
                    meta.entries(node)["saliency"] = score
            history.append({k: v.clone() for k, v in pruner.prune(sparsity, score=False).items()})
        monkeypatch.undo()
        return history, len(rewrites)

    plain, rewrites = steps(always_rewrite=False)
    rewritten, _ = steps(always_rewrite=True)
    for a, b in zip(plain, rewritten, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for earlier, later in zip(plain, plain[1:]):  # nothing pruned came back
        assert all(not (later[k] & ~earlier[k]).any() for k in later)
    # the first step (nothing pruned yet), the stale, the tied and the signed step rewrite
    assert rewrites == (6 if "max_sparsity" in options else 4)


def test_a_discarded_plain_ranking_does_not_warn_twice(mlp, mlp_batches, caplog):
    """A step whose plain ranking brings a pruned weight back is masked again with the rewrite;
    the discarded run's warnings are not shown, so a layer emptied by the step warns once."""
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    pruner = Pruner(graph, 0.9, criterion="random")
    g = torch.Generator().manual_seed(0)
    weights = [n for n in graph.weight_nodes() if n.target.endswith("weight")]

    def score(stale: bool) -> None:
        for node in weights:
            value = torch.rand(graph.parameter(node).shape, generator=g) + 0.5
            mask = meta.entries(node).get("mask")
            if node.target == "layers.2.weight":
                value = torch.zeros_like(value)  # the lowest scores: the layer goes
            elif mask is not None and not stale:
                value = value * mask
            elif mask is not None:
                value = torch.where(mask, value, 10.0)  # pruned weights score the highest
            meta.entries(node)["saliency"] = value

    score(stale=False)
    pruner.prune(0.3, score=False)  # layers.2 (128 of 1,700 weights) emptied: warned
    assert [r.getMessage().startswith("mask emptied 1 layer(s): layers.2.weight")
            for r in caplog.records if r.levelname == "WARNING"] == [True]
    caplog.clear()
    score(stale=True)  # the plain ranking keeps pruned weights: the rewrite decides
    pruner.prune(0.6, score=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # still empty: quiet
    # one record of the step's mask run, the rewrite's (the discarded run left none)
    assert [r.name for r in graph.history] == ["mask"]
    assert graph.history[-1].options["sparsity"] == 0.6
    assert sum(k for k, _ in graph.history[-1].info["kept"].values()) == sum(
        int(m.sum()) for m in pruner.masks.values())
    caplog.clear()
    kept = {k: v.clone() for k, v in pruner.masks.items()}
    for node in weights:  # layers.2 back in the ranking, then emptied again by the rewrite
        meta.entries(node)["mask"] = torch.ones_like(meta.entries(node)["mask"]) if (
            node.target == "layers.2.weight") else kept[node.target]
    score(stale=True)
    pruner.prune(0.7, score=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("mask emptied 1 layer(s): layers.2")
    caplog.clear()
    node = next(n for n in weights if n.target == "layers.2.weight")
    meta.entries(node)["mask"] = torch.ones_like(meta.entries(node)["mask"])
    score(stale=False)  # the plain ranking is kept: its warning is shown, once
    pruner.prune(0.8, score=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("mask emptied 1 layer(s): layers.2")


def test_pattern_lock_keeps_masks_on_a_plain_module(mlp, mlp_batches):
    g = torch.Generator().manual_seed(0)
    locked = {f"layers.{i}.weight": torch.rand(mlp.layers[i].weight.shape, generator=g) < 0.3
              for i in range(3)}
    pruner = Pruner(mlp, 0.9, mode="pattern-lock", masks=locked, example_inputs=mlp_batches[0][0])
    train(pruner, mlp, mlp_batches, 4)
    for name, mask in locked.items():
        weight = mlp.get_parameter(name)
        assert torch.equal(weight != 0, mask)
        assert torch.equal(pruner.masks[name], mask)
    assert not pruner.history  # pattern-lock never prunes


def test_pattern_lock_on_a_graph_uses_its_masks_and_zero_pattern(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "snip, mask{sparsity=0.8}", data=mlp_batches)
    before = {n.target: meta.entries(n)["mask"].clone() for n in graph.weight_nodes()
              if "mask" in meta.entries(n)}
    pruner = Pruner(graph, 0.99, mode="pattern-lock")
    train(pruner, graph.module, mlp_batches, 3)
    assert pruner.masks.keys() == before.keys()
    assert all(torch.equal(pruner.masks[k], before[k]) for k in before)

    torch.manual_seed(0)
    plain = type(mlp)()
    with torch.no_grad():  # a model pruned elsewhere: its zeros are the pattern
        plain.layers[1].weight[:, :16] = 0
    pruner = Pruner(plain, 0.9, mode="pattern-lock", example_inputs=mlp_batches[0][0])
    train(pruner, plain, mlp_batches, 3)
    assert int((plain.layers[1].weight == 0).sum()) == 32 * 16


def test_an_n_m_pattern_prunes_at_its_own_sparsity(mlp, mlp_batches):
    """The Pruner set every step's sparsity, which an N:M mask refuses (it fixes its own)."""
    with pytest.raises(OptionError, match=r"granularity 2:4 keeps a fixed share of the weights "
                                          r"\(sparsity 0\.5\), not 0\.9: ask for 0\.5"):
        Pruner(mlp, 0.9, mask_options={"granularity": "2:4"})
    pruner = Pruner(mlp, 0.5, criterion="magnitude", mask_options={"granularity": "2:4"},
                    example_inputs=mlp_batches[0][0])
    pruner.on_train_begin()
    pruner.on_step_begin(0)
    assert len(pruner.masks) == 3
    for name, mask in pruner.masks.items():
        groups = mask.reshape(-1, 4)
        assert torch.equal(groups.sum(1), torch.full((len(groups),), 2)), name
    # along a schedule, the first pruning step applies the whole pattern: it says so, and
    # the later steps (below the pattern's sparsity) do not select it again
    progressive = Pruner(mlp, 0.5, criterion="magnitude", mask_options={"granularity": "2:4"},
                         schedule="linear", start_step=0, end_step=4, frequency=1,
                         example_inputs=mlp_batches[0][0], initial_sparsity=0.1)
    train(progressive, mlp, mlp_batches, 6)
    assert [(h["step"], h["sparsity"]) for h in progressive.history] == [(0, 0.5)]
    assert progressive.history[0]["kept"] * 2 == progressive.history[0]["numel"]


def test_pruner_errors_say_what_to_do(mlp, mlp_batches):
    with pytest.raises(OptionError, match="criterion"):
        Pruner(mlp, 0.9, criterion="mask")
    with pytest.raises(OptionError, match="mask_options"):
        Pruner(mlp, 0.9, mask_options={"sparsity": 0.5})
    with pytest.raises(OptionError, match="scope"):
        Pruner(mlp, 0.9, mask_options={"scope": "everywhere"})
    with pytest.raises(OptionError, match="pattern-lock"):
        Pruner(mlp, 0.9, masks={})
    pruner = Pruner(mlp, 0.9, criterion="magnitude")
    with pytest.raises(DataError, match="example_inputs"):
        pruner.on_step_begin(0)
    pruner = Pruner(mlp, 0.9, criterion="snip", example_inputs=mlp_batches[0][0])
    with pytest.raises(DataError, match="needs data"):
        pruner.on_step_begin(0)


def test_snip_momentum_scores_every_step_from_the_training_gradients(mlp, mlp_batches):
    pruner = Pruner(mlp, 0.8, criterion="snip-momentum{source=grad}", schedule="linear",
                    start_step=2, end_step=6, frequency=2, example_inputs=mlp_batches[0][0])
    assert pruner.score_every_step
    counts = train(pruner, mlp, mlp_batches, 8)
    total = sum(mlp.layers[i].weight.numel() for i in range(3))
    assert counts[:4] == [0, 0, 0, 0]  # linear from 0 at step 2: the first cut is at step 4
    assert counts[4] == counts[5] == kept(total, 0.4)
    assert counts[6] == counts[7] == kept(total, 0.8)
    assert [h["step"] for h in pruner.history] == [4, 6]
    for name, mask in pruner.masks.items():
        assert torch.count_nonzero(mlp.get_parameter(name)[~mask]) == 0


@pytest.mark.parametrize("criterion", ["magnitude", "random"])  # eager path, graph path
def test_pruner_scores_only_what_its_mask_can_select(mlp, mlp_batches, criterion):
    def scored(pruner):
        pruner.prune(0.5)
        if criterion == "magnitude":
            return sorted(pruner._scores)
        return sorted(n.target for n in pruner.graph.weight_nodes()
                      if "saliency" in meta.entries(n))

    x = mlp_batches[0][0]
    assert scored(Pruner(mlp, 0.9, criterion=criterion, example_inputs=x)) == [
        "layers.0.weight", "layers.1.weight", "layers.2.weight"]
    biases = Pruner(mlp, 0.9, criterion=criterion, example_inputs=x,
                    mask_options={"biases": True})
    assert scored(biases) == sorted(n for n, _ in mlp.named_parameters())
    assert "layers.0.bias" in biases.masks


@pytest.mark.parametrize("criterion", ["magnitude", "snip-momentum{source=grad}"])
@pytest.mark.parametrize("options", [{}, {"scope": "local"}, {"max_sparsity": 0.95},
                                     {"min_keep": 40, "biases": True},
                                     {"exclude": "layers.1"}])
def test_eager_steps_make_the_masks_of_the_graph_passes(mlp, mlp_batches, monkeypatch,
                                                        criterion, options):
    """A plain module pruned with a data-free criterion is scored and selected on the module
    itself at each step, with no pass run: at every step of a training run its masks, kept
    counts and weights are those of running the passes on the graph."""
    import copy

    from chop.pipeline import manager

    def run(eager: bool):
        module = copy.deepcopy(mlp)
        pruner = Pruner(module, 0.9, criterion=criterion, schedule="cube", start_step=0,
                        end_step=7, frequency=1, mask_options=options,
                        example_inputs=mlp_batches[0][0])
        runs = []
        with monkeypatch.context() as patch:
            if not eager:
                patch.setattr(Pruner, "_eager_weights", lambda self, batch: None)
            real = manager.run
            patch.setattr(manager, "run", lambda *a, **k: (runs.append(a[1]), real(*a, **k))[1])
            patch.setattr("chop.training.pruner.run", manager.run)
            masks = []
            train(pruner, module, mlp_batches, 10, begin=False, snapshots=masks,
                  optimizer=torch.optim.Adam(module.parameters(), lr=0.05))
        return masks, pruner.history, module.state_dict(), runs

    eager, graph = run(True), run(False)
    assert eager[3] == [] and graph[3], "the eager path runs no pass"
    for step, (a, b) in enumerate(zip(eager[0], graph[0], strict=True)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    assert eager[1] == graph[1] and len(eager[1]) == 7  # steps 1-7 (0 is at sparsity 0)
    assert all(torch.equal(v, graph[2][k]) for k, v in eager[2].items())


@pytest.mark.parametrize("options", [{}, {"scope": "local"}, {"max_sparsity": 0.97}])
def test_eager_steps_rank_pruned_weights_last(mlp, mlp_batches, options):
    """Given the same scores at each step (pruned ones 0, stale ones that may be high, ties at
    0 in front of kept weights), the eager path's masks are the graph passes' (which rank
    pruned weights last): no pruned weight comes back."""
    import copy

    x = mlp_batches[0][0]
    graph = chop.trace(copy.deepcopy(mlp), (x,))
    on_graph = Pruner(graph, 0.9, criterion="random", mask_options=options)
    eager = Pruner(mlp, 0.9, criterion="magnitude", mask_options=options, example_inputs=x)
    names = list(eager._eager_weights(None))
    g = torch.Generator().manual_seed(5)
    previous = None
    for sparsity, kind in {0.3: "masked", 0.5: "masked", 0.6: "stale", 0.7: "ties",
                           0.75: "signed", 0.8: "masked"}.items():
        scores = {}
        for name in names:
            score = torch.rand(mlp.get_parameter(name).shape, generator=g)
            score = {"ties": score.round(), "signed": score - 2.0}.get(kind, score)
            if kind != "stale" and previous is not None:
                score = score * previous[name]
            scores[name] = score
            meta.entries(graph.weight_node(name))["saliency"] = score
        eager._scores = dict(scores)
        expected = on_graph.prune(sparsity, score=False)
        got = eager.prune(sparsity, score=False)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), (sparsity, kind)
        if previous is not None:
            assert all(not (got[k] & ~previous[k]).any() for k in got)
        previous = {k: v.clone() for k, v in got.items()}


@pytest.mark.parametrize("scope", ["global", "local"])
def test_channel_steps_bring_no_pruned_channel_back(scope):
    """A kept channel's members include entries of rows the next layer pruned: ranked at −∞,
    they made its sum −∞ too, and pruned channels came back from the tie."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for a, b in [(8, 16), (16, 16), (16, 16)]
                                  for m in (torch.nn.Linear(a, b), torch.nn.ReLU())],
                                torch.nn.Linear(16, 4))
    x = torch.randn(8, 8)
    pruner = Pruner(model, 0.75, criterion="magnitude", example_inputs=x,
                    mask_options={"granularity": "channel", "scope": scope})
    before: dict[str, torch.Tensor] = {}
    for sparsity in (0.25, 0.5, 0.75):
        masks = {k: m.clone() for k, m in pruner.prune(sparsity).items()}
        assert all(not (masks[k] & ~before[k]).any() for k in before if k in masks), sparsity
        before = masks


def test_eager_resume_refuses_masks_of_weights_it_does_not_select(mlp, mlp_batches):
    pruner = Pruner(mlp, 0.8, criterion="magnitude", example_inputs=mlp_batches[0][0],
                    schedule="linear", start_step=0, end_step=4)
    masks = {"layers.0.weight": torch.ones(32, 16, dtype=torch.bool),
             "layers.0.bias": torch.ones(32, dtype=torch.bool)}
    with pytest.raises(OptionError, match=r"^Pruner: masks= has masks for layers\.0\.bias, "
                                          r"which mask_options do not select"):
        pruner.resume(3, masks=masks)
    del masks["layers.0.bias"]
    masks["layers.0.weight"][0] = False  # given for one layer: the others keep everything
    pruner.resume(3, masks=masks)
    assert {k: int(m.sum()) for k, m in pruner.masks.items()} == {"layers.0.weight": 32 * 16 - 16}
    assert torch.count_nonzero(mlp.layers[0].weight[0]) == 0
    assert all(torch.count_nonzero(p) == p.numel() for p in mlp.layers[1:].parameters())
    pruner.on_step_begin(3)  # the others are pruned from their dense weights
    assert pruner.history[-1]["kept"] == kept(1664, pruner.schedule.sparsity_at(3))


def test_a_criterion_that_rewrites_scores_only_is_scored_on_the_graph(mlp, mlp_batches,
                                                                       monkeypatch):
    """A subclass of magnitude that overrides scores() inherits module_scores, which computes
    plain |w|: the eager path would have ignored the user's scores."""
    from dataclasses import dataclass
    from typing import ClassVar

    from chop.passes.analysis.criterion import effective_weight
    from chop.passes.analysis.magnitude import Magnitude

    @dataclass(frozen=True)
    class LayerScaled(Magnitude):
        name: ClassVar[str] = "layer-scaled-test"

        def scores(self, graph, nodes, ctx):
            return [effective_weight(graph, n).abs() / (1 + i) ** 3 for i, n in enumerate(nodes)]

    import copy

    def pruned(criterion):  # each on its own copy: the Pruner masks the weights in place
        return Pruner(copy.deepcopy(mlp), 0.9, criterion=criterion,
                      example_inputs=mlp_batches[0][0]).prune(0.7)

    got, magnitude = pruned(LayerScaled()), pruned("magnitude")
    monkeypatch.setattr(Pruner, "_eager_weights", lambda self, batch: None)
    expected = pruned(LayerScaled())
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not all(torch.equal(magnitude[k], expected[k]) for k in expected)


@pytest.mark.parametrize("criterion", ["magnitude", "random"])  # eager path, graph path
@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan")])
def test_prune_refuses_a_sparsity_out_of_range_before_scoring(mlp, mlp_batches, criterion,
                                                              sparsity):
    pruner = Pruner(mlp, 0.9, criterion=criterion, example_inputs=mlp_batches[0][0])
    with pytest.raises(OptionError, match=r"^mask: (sparsity=|option sparsity=nan)"):
        pruner.prune(sparsity)
    assert not pruner.history and not pruner.masks
    assert all(torch.count_nonzero(p) == p.numel() for p in mlp.parameters())


def test_one_pass_data_is_refused_up_front(mlp, mlp_batches):
    """A generator lost its first batch to the trace, then scoring said "snip asked for 2
    batches but data gave 1" of the 2 the user gave."""
    with pytest.raises(OptionError, match=r"^Pruner: data= is a one-pass iterator \(generator\)"
                                          r".*a list of \(inputs, targets\) or a DataLoader"):
        Pruner(mlp, 0.9, criterion="snip{batches=2}", data=(b for b in mlp_batches[:2]))
    pruner = Pruner(mlp, 0.9, criterion="snip{batches=2}", data=mlp_batches[:2])
    assert sum(int(m.sum()) for m in pruner.prune(0.5).values()) == kept(1664, 0.5)


def test_eager_prune_without_scores_names_the_missing_saliency(mlp, mlp_batches):
    from chop.errors import MissingMetadataError

    pruner = Pruner(mlp, 0.9, criterion="magnitude", example_inputs=mlp_batches[0][0])
    with pytest.raises(MissingMetadataError, match=r"^Pruner: the weights have no saliency yet"):
        pruner.prune(0.5, score=False)
    pruner.score()
    assert sum(int(m.sum()) for m in pruner.prune(0.5, score=False).values()) == kept(1664, 0.5)


@pytest.mark.parametrize("criterion", ["magnitude", "snip"])  # eager path, graph path
@pytest.mark.parametrize("replaced", ["model", "last layer", "last module", "gone"])
def test_replaced_parameters_are_refused_not_left_dense(mlp, mlp_batches, criterion, replaced):
    """load_state_dict(assign=True) (of the model or one of its modules) or a new module makes
    new parameters, which the masks did not reach: the model trained dense while the history
    said 90%. Refused at the next step, pruning or not, and by prune(); so is a masked layer
    that left the model."""
    pruner = Pruner(mlp, 0.9, criterion=criterion, data=mlp_batches[:1],
                    example_inputs=mlp_batches[0][0])
    pruner.prune(0.5)
    saved = {k: v.clone() for k, v in mlp.state_dict().items()}
    last = mlp.layers[2]
    if replaced == "model":
        mlp.load_state_dict(saved, assign=True)
    elif replaced == "last layer":
        last.load_state_dict({k: v.clone() for k, v in last.state_dict().items()}, assign=True)
    elif replaced == "last module":
        mlp.layers[2] = torch.nn.Linear(last.in_features, last.out_features)
    else:  # the masked layer is no longer in the model
        mlp.layers = torch.nn.Sequential(*list(mlp.layers)[:2])
    name = "layers.0.weight" if replaced == "model" else "layers.2.weight"
    message = (rf"^Pruner: the model's parameter {name} is not the one the Pruner masks.*"
               r"resume\(step, masks=")
    with pytest.raises(DataError, match=message):
        pruner.on_step_begin(7)  # not a pruning step (no schedule reaches it)
    with pytest.raises(DataError, match=message):
        pruner.prune(0.6)
    if replaced != "model":
        return
    fresh = Pruner(mlp, 0.9, criterion=criterion, data=mlp_batches[:1],
                   example_inputs=mlp_batches[0][0])
    fresh.resume(1, masks=pruner.masks)
    assert sum(int(m.sum()) for m in fresh.prune(0.6).values()) == kept(1664, 0.6)


def test_eager_steps_name_a_layer_with_nan_scores(mlp, mlp_batches):
    pruner = Pruner(mlp, 0.9, criterion="magnitude", example_inputs=mlp_batches[0][0])
    with torch.no_grad():
        mlp.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="the saliency of layers.1.weight holds NaN"):
        pruner.prune(0.5)
    assert pruner.masks == {} and not pruner.history


def test_pruner_steps_are_linted_once_and_again_after_an_edit(mlp, mlp_batches, monkeypatch):
    from chop.ir.graph import Graph

    lints = []
    real = Graph.lint
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    pruner = Pruner(graph, 0.9, criterion="magnitude")
    monkeypatch.setattr(Graph, "lint", lambda self, *a, **k: (lints.append(1), real(self, *a, **k)))

    def step(sparsity):
        lints.clear()
        pruner.prune(sparsity)
        return len(lints)

    # the first step lints both passes; the first mask run inserts the mask nodes, so the
    # criterion's next run meets a new graph; after that the graph stays: no lints
    assert [step(0.3), step(0.5), step(0.55)] == [2, 1, 0]
    chop.run(graph, "fold")  # an edit: the next step is linted again
    assert step(0.6) == 2
    total = sum(m.numel() for m in pruner.masks.values())
    assert pruner.history[-1]["kept"] == kept(total, 0.6)


def test_pruner_masks_of_an_earlier_step_stay_as_they_were(mlp, mlp_batches):
    pruner = Pruner(mlp, 0.9, criterion="magnitude", example_inputs=mlp_batches[0][0])
    earlier = pruner.prune(0.3)
    saved = {name: mask.clone() for name, mask in earlier.items()}
    later = pruner.prune(0.6)  # the pruner updates its own copies in place, not these
    assert all(torch.equal(earlier[name], saved[name]) for name in saved)
    for name, mask in later.items():
        assert torch.count_nonzero(mlp.get_parameter(name)[~mask]) == 0
        assert torch.count_nonzero(mlp.get_parameter(name)[mask]) == int(mask.sum())


def test_came_back_walks_flat_and_split_masks_alike() -> None:
    """The numpy check walks both sides part by part, eight entries at a time: any layout
    (one flat tensor or one per layer, sizes not multiples of 8, empty layers) gives the
    answer of comparing entry by entry."""
    import random

    from chop.training.pruner import _came_back

    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    for _ in range(500):
        sizes = [rng.randint(0, 40) for _ in range(rng.randint(1, 5))]
        old = [torch.rand(n, generator=g) > 0.3 for n in sizes]
        new = [o & (torch.rand(n, generator=g) > 0.5) for o, n in zip(old, sizes)]
        if rng.random() < 0.5 and sum(sizes):
            i = rng.choice([i for i, n in enumerate(sizes) if n])
            new[i][rng.randrange(sizes[i])] = True
        expected = any(bool((n & ~o).any()) for n, o in zip(new, old))
        for before, after in ((old, new), ([torch.cat(old)], new), (old, [torch.cat(new)])):
            assert _came_back(before, after) == expected, sizes
    for where in (None, 0, 3, 70_001, 70_002, 140_004):  # large parts: 64-bit words
        flat_old = torch.rand(140_005, generator=g) > 0.3
        flat_new = flat_old & (torch.rand(140_005, generator=g) > 0.5)
        if where is not None:  # pruned before, kept now
            flat_old[where], flat_new[where] = False, True
        old, new = flat_old.split([70_003, 70_002]), flat_new.split([70_003, 70_002])
        assert _came_back(list(old), list(new)) == (where is not None)
        assert _came_back([flat_old], [flat_new]) == (where is not None)


@pytest.mark.parametrize("kind", ["plain", "subclass"])
def test_came_back_finds_a_pruned_position_kept_again(kind: str) -> None:
    """The Pruner's check that decides whether to rerun the selection with pruned weights
    ranked last: numpy on plain CPU tensors, torch otherwise; both answer alike."""
    from chop.training.pruner import _came_back

    g = torch.Generator().manual_seed(0)
    old = {"a": torch.rand(6, 5, generator=g) > 0.5, "b": torch.rand(9, generator=g) > 0.5}
    old["b"][-1] = False

    def wrap(masks):
        return list(masks.values()) if kind == "plain" else [
            torch.nn.Parameter(m, requires_grad=False) for m in masks.values()]

    def came_back(before, after):  # the masks one by one, and before as one flat tensor
        one = _came_back(wrap(before), wrap(after))
        flat = [torch.cat([m.reshape(-1) for m in wrap(before)])]
        assert _came_back(flat, wrap(after)) == one
        return one

    dropped = {k: m.clone() for k, m in old.items()}
    dropped["a"][old["a"]] = False  # pruned more, nothing back
    back = {k: m.clone() for k, m in dropped.items()}
    back["b"][-1] = True  # b's last entry, pruned, kept again
    assert not came_back(old, old)
    assert not came_back(old, dropped)
    assert came_back(old, back)
    assert came_back(dropped, old)


@pytest.mark.parametrize("criterion", ["snip", "magnitude"])  # graph path, eager path
def test_a_resumed_run_prunes_as_the_run_that_never_stopped(mlp, mlp_batches, criterion):
    """A Pruner made afresh after a restart (SNIPCallback with resume_from_checkpoint) scored
    the trained weights with no masks: pruned weights came back and the masks differed."""
    import copy

    def pruner(model):
        return Pruner(model, 0.8, criterion=criterion, schedule="linear", start_step=0,
                      end_step=6, frequency=2, data=mlp_batches[:1])

    straight = copy.deepcopy(mlp)
    whole = pruner(straight)
    train(whole, straight, mlp_batches, 8, momentum=0.0)  # no optimizer state to restore

    stopped = copy.deepcopy(mlp)
    first = pruner(stopped)
    train(first, stopped, mlp_batches, 3, momentum=0.0)  # saved after 3 steps
    restarted = copy.deepcopy(stopped)  # the checkpoint: weights only
    second = pruner(restarted)
    second.on_train_begin()
    second.resume(3, mlp_batches[0])
    assert second.masks.keys() == first.masks.keys()
    assert all(torch.equal(second.masks[k], m) for k, m in first.masks.items())
    train(second, restarted, mlp_batches, range(3, 8), momentum=0.0, begin=False)

    assert [h["step"] for h in second.history] == [4, 6]
    for name, mask in whole.masks.items():
        assert torch.equal(second.masks[name], mask), name
    for a, b in zip(straight.parameters(), restarted.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("criterion", ["snip", "magnitude"])  # graph path, eager path
def test_resuming_with_the_masks_saved_before_any_pruning(mlp, mlp_batches, criterion):
    """pruner.masks is {} until a step prunes (the schedule's first step, at sparsity 0, does
    not); resume(step, masks={}) after it failed inside torch on the graph path (a multi-tensor
    copy of no tensors)."""
    import copy

    def pruner(model):
        return Pruner(model, 0.8, criterion=criterion, schedule="linear", start_step=1,
                      end_step=7, frequency=3, data=mlp_batches[:1])

    straight = copy.deepcopy(mlp)
    whole = pruner(straight)
    train(whole, straight, mlp_batches, 8, momentum=0.0)
    stopped = copy.deepcopy(mlp)
    first = pruner(stopped)
    train(first, stopped, mlp_batches, 3, momentum=0.0)
    assert first.masks == {}
    restarted = copy.deepcopy(stopped)
    second = pruner(restarted)
    second.on_train_begin()
    second.resume(3, masks=first.masks)
    assert second.masks == {}
    train(second, restarted, mlp_batches, range(3, 8), momentum=0.0, begin=False)
    assert second.masks.keys() == whole.masks.keys()
    for name, mask in whole.masks.items():
        assert torch.equal(second.masks[name], mask), name


@pytest.mark.parametrize("criterion", ["snip-momentum{source=grad}", "snip-momentum",
                                       "magnitude"])  # eager, graph (accumulating), eager
@pytest.mark.parametrize("back_to", [1, 5])  # before start_step, after its first pruning
def test_a_pruner_rolled_back_in_process_prunes_as_one_resumed_afresh(
        mlp, mlp_batches, criterion, back_to):
    """resume() on a Pruner that ran on past the checkpoint: it kept the scores accumulated
    after it (snip-momentum) and, before start_step, the later masks and sparsity."""
    import copy

    def pruner(model):
        return Pruner(model, 0.9, criterion=criterion, schedule="linear", start_step=2,
                      end_step=8, frequency=2, data=mlp_batches[:1])

    model = copy.deepcopy(mlp)
    ran = pruner(model)
    train(ran, model, mlp_batches, back_to, momentum=0.0)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    saved = {k: m.clone() for k, m in ran.masks.items()}
    train(ran, model, mlp_batches, range(back_to, 7), momentum=0.0, begin=False)
    assert ran.sparsity > 0.5
    model.load_state_dict(checkpoint)
    ran.resume(back_to, mlp_batches[0], masks=saved or None)
    assert ran.sparsity == (0.0 if back_to < 2 else ran.schedule.sparsity_at(back_to - 1))
    assert [h["step"] for h in ran.history] == [h for h in (4,) if h < back_to]

    again = copy.deepcopy(mlp)
    again.load_state_dict(checkpoint)
    fresh = pruner(again)
    fresh.on_train_begin()
    fresh.resume(back_to, mlp_batches[0], masks=saved or None)
    for p in (ran, fresh):
        train(p, model if p is ran else again, mlp_batches, range(back_to, 9), momentum=0.0,
              begin=False)
    assert ran.history == [h for h in ran.history if h["step"] < back_to] + fresh.history
    assert ran.masks.keys() == fresh.masks.keys()
    for name, mask in fresh.masks.items():
        assert torch.equal(ran.masks[name], mask), name
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_a_forward_wrapped_in_autocast_is_traced_as_the_class_wrote_it(mlp, mlp_batches):
    """accelerate (the Trainer with bf16=True) replaces the instance's forward by an autocast
    wrapper, which exported as one opaque node: no weight could be scored."""
    original = mlp.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*args, **kwargs)

    mlp._original_forward = original
    mlp.forward = wrapped
    pruner = Pruner(mlp, 0.5, criterion="snip", data=mlp_batches[:1])
    pruner.on_train_begin()
    pruner.on_step_begin(0, mlp_batches[0])
    assert pruner.history[-1]["sparsity"] == 0.5 and len(pruner.masks) == 3
    assert mlp.forward is wrapped  # put back


@pytest.mark.parametrize(("masks", "message"), [
    ({"layers.9.weight": None}, r"masks= has a mask for 'layers\.9\.weight', which is not a "
                                r"parameter of MLP \(did you mean 'layers\.2\.weight'\?\)"),
    ({"layers.1.weight": torch.ones(16, 32, dtype=torch.bool)},
     r"the mask of layers\.1\.weight is bool\[16, 32\], not a bool \(or 0/1\) tensor of the "
     r"parameter's shape \[32, 32\]; give one \(True = kept\)"),
    ({"layers.1.weight": torch.ones(32, dtype=torch.bool)},  # broadcastable, not the shape
     r"the mask of layers\.1\.weight is bool\[32\], not"),
    ({"layers.1.weight": [[True]]}, r"the mask of layers\.1\.weight is a list, not"),
    ({"layers.1.weight": torch.full((32, 32), 0.5)},
     r"the mask of layers\.1\.weight is float32\[32, 32\], not a bool \(or 0/1\)"),
])
def test_pattern_lock_masks_are_checked(mlp, mlp_batches, masks, message):
    pruner = Pruner(mlp, 0.9, mode="pattern-lock", masks=masks, example_inputs=mlp_batches[0][0])
    with pytest.raises(OptionError, match=r"^Pruner: " + message):
        pruner.on_train_begin()
    assert not pruner.masks  # nothing inserted into the graph


def test_a_graph_resumes_from_saved_masks_not_from_its_dense_weights(mlp, mlp_batches):
    """A chop.Graph keeps its pruned weights dense behind its masks: resume read "keep all"
    from them, silently, and trained on dense."""
    import copy

    def pruner(graph):
        return Pruner(graph, 0.8, criterion="magnitude", schedule="linear", start_step=0,
                      end_step=6, frequency=2)

    straight = chop.trace(copy.deepcopy(mlp), (mlp_batches[0][0],))
    whole = pruner(straight)
    train(whole, straight.module, mlp_batches, 8, momentum=0.0)

    stopped = chop.trace(copy.deepcopy(mlp), (mlp_batches[0][0],))
    first = pruner(stopped)
    train(first, stopped.module, mlp_batches, 3, momentum=0.0)
    saved = {name: mask.clone() for name, mask in first.masks.items()}
    weights = {k: v.clone() for k, v in stopped.module.state_dict().items()
               if not k.endswith("_mask")}
    model = copy.deepcopy(mlp)
    model.load_state_dict(weights)  # the checkpoint: dense weights
    restarted = chop.trace(model, (mlp_batches[0][0],))
    with pytest.raises(DataError, match=r"^Pruner\.resume\(3\): the pruned weights are 0\.0% "
                                        r"zeros, but the schedule had reached sparsity 0\.266667 "
                                        r"by step 2.*resume\(step, masks=\.\.\.\)"):
        pruner(restarted).resume(3)
    second = pruner(restarted)
    second.resume(3, masks=saved)
    train(second, restarted.module, mlp_batches, range(3, 8), momentum=0.0, begin=False)
    assert [h["step"] for h in second.history] == [4, 6]
    for name, mask in whole.masks.items():
        assert torch.equal(second.masks[name], mask), name


def test_scoring_every_step_keeps_one_scoring_record(mlp, mlp_batches):
    """snip-momentum scored at every step added a graph.history record each time: report.json
    listed the criterion once per training step."""
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    pruner = Pruner(graph, 0.8, criterion="snip-momentum{source=grad}", schedule="linear",
                    start_step=0, end_step=20, frequency=10)
    train(pruner, graph.module, mlp_batches, 15)
    assert [r.name for r in graph.history] == ["mask", "snip-momentum"]
    assert [h["step"] for h in pruner.history] == [10]  # step 0's sparsity is 0
