"""Pipelines: parsing, option checking, requirements, timing and failure wrapping."""

from __future__ import annotations

import pytest
import torch

import chop
from chop.ir import meta
from chop.passes.analysis.snip import Snip
from chop.passes.export.fold import Fold
from chop.passes.transform.mask import Mask
from chop.pipeline.manager import as_passes, parse_pipeline


def test_pipeline_string_builds_typed_passes():
    passes = parse_pipeline("snip{batches=2}, mask{sparsity=0.5, scope=global}, fold")
    assert passes == [Snip(batches=2), Mask(sparsity=0.5, scope="global"), Fold()]
    assert [str(p) for p in passes] == ["snip{batches=2}", "mask{sparsity=0.5}", "fold"]


def test_values_are_typed_like_toml():
    (mask,) = parse_pipeline("mask{sparsity=0, include='a,b{c}=d', biases=true}")
    assert mask.sparsity == 0.0 and isinstance(mask.sparsity, float)  # int widened to float
    assert mask.include == "a,b{c}=d" and mask.biases is True


def test_pipeline_forms_are_equivalent():
    assert as_passes([Snip(), "mask{sparsity=0.5}", Fold]) == as_passes("snip, mask{sparsity=0.5}, fold")
    assert as_passes(Fold()) == [Fold()]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("snip, mask{sparsity=0.9", r"column 24: expected ',' or '}', found the end"),
        ("snip mask", r"column 6: expected ',' or the end, found 'mask'"),
        ("mask{sparsity 0.9}", r"expected '=', found '0.9'"),
        ("mask{include='abc}", r"an unterminated quote"),
        ("", r"the pipeline is empty"),
        ("snip; mask", r"column 5: expected ',' between passes, found ';'"),
        ("mask{sparsity=0.5, sparsity=0.99}",
         r"column 20: expected each option once, found 'sparsity' a second time"),
    ],
)
def test_syntax_errors_point_at_the_column(text, message):
    with pytest.raises(chop.PipelineError, match=message):
        parse_pipeline(text)


def test_unknown_pass_lists_known_passes():
    with pytest.raises(chop.PipelineError, match=r"unknown pass 'snp' \(did you mean 'snip'\?\); known passes: snip, magnitude, random, "):
        parse_pipeline("snp, mask")


def test_unknown_option_lists_allowed_options():
    with pytest.raises(chop.OptionError, match=r"mask has no option 'sparsty' \(did you mean 'sparsity'\?\); its options are: sparsity, scope, granularity, "):
        parse_pipeline("mask{sparsty=0.9}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mask{sparsity=high}", r"mask: option sparsity='high' is not valid; expected float"),
        ("mask{scope=everywhere}", r"scope='everywhere' is not valid; expected one of 'global', 'local'"),
        ("snip{batches=1.5}", r"snip: option batches=1.5 is not valid; expected int"),
        ("mask{biases=1}", r"option biases=1 is not valid; expected bool"),
        # NaN compared false with every bound, so range checks let it (and inf) through
        ("snip-momentum{alpha=nan}", r"alpha=nan is not valid; expected float \(a finite"),
        ("grasp{temperature=inf}", r"temperature=inf is not valid; expected float \(a finite"),
    ],
)
def test_ill_typed_options(text, message):
    with pytest.raises(chop.OptionError, match=message):
        parse_pipeline(text)


def test_bad_pipeline_objects():
    with pytest.raises(chop.PipelineError, match="pipeline items must be pass objects or strings; got int"):
        as_passes([Snip(), 3])
    with pytest.raises(chop.PipelineError, match="a pipeline is a string, a pass, or a list of passes; got dict"):
        as_passes({"snip": {}})


def test_requirements_are_checked_before_anything_runs(cnn_graph, cnn_batches):
    with pytest.raises(chop.MissingMetadataError, match=r"pass 'fold' needs 'mask'.*passes before it: snip"):
        chop.run(cnn_graph, "snip, fold", data=cnn_batches)
    assert cnn_graph.history == []
    assert not any("saliency" in n.meta["chop"] for n in cnn_graph.weight_nodes())


def test_history_records_each_pass_with_options_and_time(cnn_graph, cnn_batches):
    chop.run(cnn_graph, "snip{batches=2}, mask{sparsity=0.5}, fold", data=cnn_batches)
    records = cnn_graph.history
    assert [r.name for r in records] == ["snip", "mask", "fold"]
    assert records[0].options["batches"] == 2 and records[0].options["accumulate"] == "abs-of-sum"
    assert all(r.seconds > 0 for r in records)
    assert [r.modified for r in records] == [False, True, True]
    assert records[1].info["kept"]["fc.weight"][1] == 1280


def test_failures_name_the_pass_the_passes_before_and_the_node(cnn_graph, cnn_batches):
    x, _ = cnn_batches[0]
    bad = [(x, torch.randint(0, 10, (3,)))]  # 6 outputs, 3 targets
    with pytest.raises(chop.DataError, match=r"^pass 'snip' \(after the following passes: magnitude\): logits of shape \(6, 10\) do not match targets of shape \(3,\)"):
        chop.run(cnn_graph, "magnitude, snip", data=bad)

    def broken_loss(outputs, targets):
        raise RuntimeError("boom")

    # the user's own loss failing is a mistake in the input (exit 2), not a bug in chop
    with pytest.raises(chop.DataError, match=r"^pass 'snip': snip: the loss raised RuntimeError: boom") as info:
        chop.run(cnn_graph, "snip", data=cnn_batches, loss=broken_loss)
    assert isinstance(info.value.__cause__, chop.DataError)
    assert isinstance(info.value.__cause__.__cause__, RuntimeError)


def test_failure_while_visiting_a_node_names_it(cnn_graph):
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Explode(chop.Pass):
        name: ClassVar[str] = "explode"
        kind: ClassVar[str] = "analysis"

        def apply(self, graph, ctx):
            for node in graph.weight_nodes():
                with ctx.visiting(node):
                    if node.target == "conv2.weight":
                        raise ValueError("bad weight")
            return chop.PassResult(False)

    # an unexpected exception inside a pass is a bug: InternalError, not a ChopError
    with pytest.raises(chop.InternalError, match=r"pass 'explode' while processing node conv2_weight \(conv2.weight\) failed: ValueError: bad weight") as info:
        chop.run(cnn_graph, [Explode()])
    assert not isinstance(info.value, chop.ChopError)
    assert isinstance(info.value.__cause__, ValueError)


def test_a_pass_that_fails_with_grad_off_leaves_grad_mode_as_it_was(cnn_graph, cnn_batches):
    """torch's no_grad block of an exported graph does not turn grad back on when its body
    raises: every later snip in the process then failed ("the loss does not depend on the
    model's weights")."""
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class GradOff(chop.Pass):
        name: ClassVar[str] = "grad-off"
        kind: ClassVar[str] = "analysis"

        def apply(self, graph, ctx):
            torch.set_grad_enabled(False)
            raise ValueError("failed inside a no_grad block")

    with pytest.raises(chop.InternalError, match="failed inside a no_grad block"):
        chop.run(cnn_graph, [GradOff()])
    assert torch.is_grad_enabled()
    chop.run(cnn_graph, "snip", data=cnn_batches)


def test_run_needs_a_traced_graph(cnn, cnn_batches):
    """Hole 6: chop.run(nn.Module, ...) raised a raw AttributeError."""
    with pytest.raises(chop.TraceError, match=r"^chop\.run needs a chop\.Graph, got a ResidualCNN; "
                                              r"trace the model first: graph = chop\.trace\(model, "
                                              r"example_inputs\), then chop\.run\(graph, \.\.\.\)$"):
        chop.run(cnn, "snip, mask", data=cnn_batches)


def test_a_model_without_parameters_is_refused_before_scoring(cnn_batches):
    """Hole 6: a model with no parameters failed with torch's "`inputs` argument to grad()
    cannot be empty" (an internal error)."""
    graph = chop.trace(torch.nn.Flatten(), cnn_batches[0][0])
    with pytest.raises(chop.PassError, match=r"^Flatten has no parameters, so pass 'snip' has no "
                                             r"weight to score or prune; trace the model that "
                                             r"holds the weights"):
        chop.run(graph, "snip, mask", data=cnn_batches)


def test_a_pass_is_linted_once_while_the_graph_stays_as_its_run_left_it(cnn_graph, monkeypatch):
    from chop.ir.graph import Graph

    lints = []
    real = Graph.lint
    monkeypatch.setattr(Graph, "lint", lambda self, *a, **k: (lints.append(1), real(self, *a, **k)))

    def linted(pipeline):
        lints.clear()
        chop.run(cnn_graph, pipeline)
        return len(lints)

    assert [linted("magnitude"), linted("magnitude")] == [1, 0]
    assert linted("mask{sparsity=0.5}") == 1  # inserts the mask nodes: an edit
    assert [linted("magnitude"), linted("mask{sparsity=0.6}"), linted("magnitude")] == [1, 0, 0]
    cnn_graph.weight_node("conv1.bias").meta["chop"]["saliency"] = torch.zeros(3)
    cnn_graph.recompile()  # an edit (fx's rule: recompile after one) forgets what was linted
    with pytest.raises(chop.LintError, match="conv1.bias"):
        chop.run(cnn_graph, "mask{sparsity=0.5}")
    # a pass that reshapes parameters is linted every time
    assert [linted("magnitude, fold, shrink"), linted("shrink")] == [3, 1]


def test_verify_false_skips_the_checks_and_lints_but_records_and_wraps(cnn_graph):
    # without verify, a missing requirement is found by the pass itself, still named by the manager
    with pytest.raises(chop.MissingMetadataError, match=r"^pass 'mask': weight conv1.weight has no saliency"):
        chop.run(cnn_graph, "mask{sparsity=0.5}", verify=False)
    with pytest.raises(chop.MissingMetadataError, match=r"pass 'mask' needs 'saliency'"):
        chop.run(cnn_graph, "mask{sparsity=0.5}")
    chop.run(cnn_graph, "magnitude")
    bias = cnn_graph.weight_node("conv1.bias")
    meta.entries(bias)["saliency"] = torch.zeros(3)  # the wrong shape: only a lint finds it
    chop.run(cnn_graph, "mask{sparsity=0.5}", verify=False)
    assert [r.name for r in cnn_graph.history] == ["magnitude", "mask"]
    assert cnn_graph.history[-1].info["kept"]["fc.weight"][1] == 1280
    with pytest.raises(chop.LintError, match="conv1.bias"):
        chop.run(cnn_graph, "mask{sparsity=0.5}")


@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("enabled", [True, False])
def test_passes_run_with_the_garbage_collector_paused_and_restored(cnn_graph, fails, enabled):
    import gc
    from dataclasses import dataclass
    from typing import ClassVar

    seen = []

    @dataclass(frozen=True)
    class Probe(chop.Pass):
        name: ClassVar[str] = "probe"
        kind: ClassVar[str] = "analysis"

        def apply(self, graph, ctx):
            seen.append(gc.isenabled())
            if fails:
                raise ValueError("boom")
            return chop.PassResult(False)

    (gc.enable if enabled else gc.disable)()
    try:
        if fails:
            with pytest.raises(chop.InternalError, match="boom"):
                chop.run(cnn_graph, [Probe(), Probe()])
        else:
            chop.run(cnn_graph, [Probe(), Probe()])
        assert seen == ([False] if fails else [False, False])
        assert gc.isenabled() is enabled  # as it was before the run, also after a failure
    finally:
        gc.enable()


def test_an_export_before_the_masks_it_acts_on_is_warned_about(cnn_graph, cnn_batches, caplog):
    """"snip, shrink, mask" ran shrink on a graph without masks: it did nothing, silently."""
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(cnn_graph, "snip, shrink, mask{granularity=channel}", data=cnn_batches)
    assert [(r.name, r.modified) for r in cnn_graph.history][1:] == [("shrink", False),
                                                                    ("mask", True)]
    assert ("pass 'shrink' changed nothing: it ran before 'mask', which makes the masks it acts "
            "on; put it after, e.g. \"snip, mask, shrink\"") in caplog.messages
    caplog.clear()
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(cnn_graph, "shrink")  # masks there, nothing they emptied: nothing to say
    assert not [m for m in caplog.messages if "changed nothing" in m]


def test_an_export_on_a_graph_without_masks_is_warned_about(cnn, cnn_batches, caplog):
    """"snip, shrink" (no mask anywhere) did nothing, silently."""
    graph = chop.trace(cnn, (cnn_batches[0][0][:2],))
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(graph, "snip, shrink", data=cnn_batches)
    assert [m for m in caplog.messages if "changed nothing" in m] == [
        "pass 'shrink' changed nothing: the graph has no masks for it to act on; run a criterion "
        "and mask before it, e.g. \"snip, mask{granularity=channel}, shrink\""]


def test_chop_run_names_itself_for_a_misspelled_keyword(mlp, mlp_batches):
    """It said "PassManager.run() got an unexpected keyword argument", a function not called."""
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    with pytest.raises(TypeError, match=r"^run\(\) got an unexpected keyword argument 'los'"):
        chop.run(graph, "magnitude", data=mlp_batches, los=None)


def test_every_pass_reads_the_same_batches_from_a_generator(mlp, mlp_batches):
    """snip took the first two batches and gradient the next two; after a one-batch scoring,
    shrink's output check found the generator empty."""
    from_list = chop.run(chop.trace(mlp, (mlp_batches[0][0],)), "snip{batches=2}",
                         data=mlp_batches[:2])
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    stream = iter(mlp_batches)
    chop.run(graph, "gradient{batches=1}, snip{batches=2}", data=stream)
    assert next(stream) is mlp_batches[2]  # read once, as many as the passes need
    for node in graph.weight_nodes():
        assert torch.equal(node.meta["chop"]["saliency"],
                           from_list.weight_node(node.target).meta["chop"]["saliency"])
    one = (batch for batch in mlp_batches[:1])
    chop.run(chop.trace(mlp, (mlp_batches[0][0],)),
             "snip, mask{granularity=channel, sparsity=0.3}, shrink", data=one)

