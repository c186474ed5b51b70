"""The Criterion base: a criterion written in a few lines gets the shared options and checks,
exactly its batches with progress, storage, info and the plain-function form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import chop
from chop.passes.analysis.criterion import Criterion, DataCriterion
from chop.pipeline import registry
from chop.pipeline.pass_base import Context


@dataclass(frozen=True)
class BatchCount(DataCriterion):
    """Saliency w (signed, like GraSP's) times the number of batches it was given."""

    name: ClassVar[str] = "batch-count"

    def scores(self, graph, nodes, ctx):
        seen = sum(1 for _ in ctx.data)
        return [seen * graph.parameter(n).detach() for n in nodes]

    def info(self, graph, nodes, scores):
        return {"had_saliency": sum("saliency" in n.meta.get("chop", {}) for n in nodes)}


def test_a_new_criterion_gets_the_shared_options_and_checks():
    table = {name: (kind, default) for name, kind, default, _ in BatchCount.option_table()}
    assert table == {"params": ("all|prunable", "all"), "normalize": ("bool", False),
                     "batches": ("int", 1), "bn": ("eval|train", "eval"),
                     "distributed": ("auto|off", "auto")}
    with pytest.raises(chop.OptionError, match="batch-count: batches=0 must be at least 1"):
        BatchCount(batches=0)
    with pytest.raises(chop.OptionError, match="params='some' is not valid"):
        BatchCount(params="some")
    assert BatchCount(batches=3).data_batches() == 3


def test_the_hook_reads_exactly_its_batches_with_progress(mlp, mlp_batches, saliency_of):
    calls = []

    def track(items, total, description):
        calls.append((total, description))
        return items

    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, [BatchCount(batches=2)], data=mlp_batches, track=track)  # 3 batches given
    assert calls == [(2, "batch-count")]
    for name, p in mlp.named_parameters():
        assert torch.equal(saliency_of(graph)[name], 2 * p.detach())
    with pytest.raises(chop.DataError, match="batch-count asked for 5 batches but data gave 3"):
        chop.run(graph, [BatchCount(batches=5)], data=mlp_batches)
    with pytest.raises(chop.DataError, match="batch-count needs data"):
        chop.run(graph, [BatchCount()])


def test_storage_drops_stale_scores_and_info_runs_before_it(cnn, cnn_batches, saliency_of):
    graph = chop.trace(cnn, (cnn_batches[0][0],))
    chop.run(graph, [BatchCount(params="prunable")], data=cnn_batches)
    assert graph.history[-1].info == {"scored": 3, "had_saliency": 0}
    chop.run(graph, "magnitude")
    assert len(saliency_of(graph)) == len(list(cnn.parameters()))
    chop.run(graph, [BatchCount(params="prunable")], data=cnn_batches)
    assert set(saliency_of(graph)) == {"conv1.weight", "conv2.weight", "fc.weight"}
    assert graph.history[-1].info == {"scored": 3, "had_saliency": 3}  # magnitude's, before


def test_normalize_divides_by_the_sum_of_absolute_values(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, [BatchCount(normalize=True)], data=mlp_batches)
    total = sum(float(p.detach().double().abs().sum()) for p in mlp.parameters())
    assert graph.history[-1].info["normalizer"] == pytest.approx(total, rel=1e-12)
    for name, p in mlp.named_parameters():
        torch.testing.assert_close(saliency_of(graph)[name], p.detach() / total)


def test_normalize_keeps_the_ranking_of_half_precision_scores(saliency_of):
    """Divided in float16, the scores of a 1000x1000 layer underflowed to a few dozen values and
    the mask changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10)).half()
    graph = chop.trace(model, (torch.randn(2, 1000, dtype=torch.float16),))
    plain = chop.run(graph.copy(), "magnitude, mask{sparsity=0.9}")
    chop.run(graph, "magnitude{normalize=true}, mask{sparsity=0.9}")
    scores = saliency_of(graph)["0.weight"]
    assert scores.dtype == torch.float32
    assert scores.unique().numel() == saliency_of(plain)["0.weight"].unique().numel()
    masks = {n.target: n.meta["chop"]["mask"] for n in graph.weight_nodes()
             if "mask" in n.meta["chop"]}
    assert len(masks) == 2
    for name, mask in masks.items():
        assert torch.equal(mask, plain.weight_node(name).meta["chop"]["mask"])


def test_compute_is_the_plain_function_form(mlp, mlp_batches, saliency_of):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    scores = BatchCount.compute(graph, mlp_batches, batches=3)
    assert scores.keys() == saliency_of(graph).keys()
    for name, p in mlp.named_parameters():
        assert scores[name] is saliency_of(graph)[name]
        assert torch.equal(scores[name], 3 * p.detach())
    with pytest.raises(chop.OptionError, match="batch-count has no option 'batch'"):
        BatchCount.compute(graph, mlp_batches, batch=2)


def test_a_criterion_must_define_its_scores():
    @dataclass(frozen=True)
    class NoScores(Criterion):
        """Forgot the hook."""

        name: ClassVar[str] = "no-scores"

    with pytest.raises(TypeError, match="abstract method.*scores"):
        NoScores()


def test_every_registered_criterion_is_a_criterion():
    criteria = [registry.get(name) for name in registry.providers("saliency")
                if registry.get(name).kind == "analysis"]
    assert len(criteria) == 9
    for cls in criteria:
        assert issubclass(cls, Criterion), cls.name
        assert {"params", "normalize"} <= {name for name, *_ in cls.option_table()}, cls.name
        if cls.data_batches is not Criterion.data_batches:  # reads data: batches and bn
            assert issubclass(cls, DataCriterion), cls.name


def test_the_hooks_own_context_is_the_managers(mlp, mlp_batches):
    """The hook gets the pass's own Context (only its data swapped), so a node it marks with
    ``ctx.visiting`` names the failure, and the data is restored afterwards."""

    @dataclass(frozen=True)
    class Fails(DataCriterion):
        """Fails on its first node."""

        name: ClassVar[str] = "fails"

        def scores(self, graph, nodes, ctx):
            with ctx.visiting(nodes[0]):
                raise chop.DataError("no good")

    graph = chop.trace(mlp, (mlp_batches[0][0],))
    with pytest.raises(chop.DataError, match=r"while processing node .* \(layers\.0\.weight\)"):
        chop.run(graph, [Fails()], data=mlp_batches)
    ctx = Context(data=mlp_batches)
    with pytest.raises(chop.DataError):
        Fails().apply(graph, ctx)
    assert ctx.data is mlp_batches


def test_nothing_to_score_is_a_clear_error():
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(10, 4)

        def forward(self, ids):
            return self.table(ids).sum(1)

    graph = chop.trace(Embed(), (torch.randint(0, 10, (2, 3)),))
    data = [(torch.randint(0, 10, (2, 3)), torch.randint(0, 4, (2,)))]
    with pytest.raises(chop.PassError, match="no weights to score with params=prunable.*params=all"):
        chop.run(graph, "snip{params=prunable}", data=data)
