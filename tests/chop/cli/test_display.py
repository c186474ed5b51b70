"""chop.cli.display: the per-layer table and summary lines of a report, the progress display,
and chop's log on the console."""

from __future__ import annotations

import logging

import pytest
from rich.console import Console

import chop
from chop.cli.display import Display, layer_table, logging_to, print_report
from chop.cli.report import build_report


def layer(name, op, shape, numel, kept, pruned=True):
    return {"name": name, "layer": name.rpartition(".")[0], "op": op, "role": "linear",
            "shape": shape, "numel": numel, "kept": kept, "sparsity": 1 - kept / numel,
            "pruned": pruned, "saliency": None}


REPORT = {
    "model": "Net",
    "layers": [layer("conv.weight", "conv2d", [8, 3, 3, 3], 216, 54),
               layer("fc.weight", "linear", [10, 1000], 10000, 1000),
               layer("head.weight", "linear", [2, 10], 20, 20, pruned=False)],
    "totals": {"layers": 3, "numel": 10236, "kept": 1074, "sparsity": 1 - 1074 / 10236,
               "parameters": 12000, "nonzero": 2838},
}


def render(renderable, width: int = 160) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]


def printed(report) -> list[str]:
    console = Console(record=True, width=200, color_system=None)
    print_report(report, console)
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_layer_table_rows_and_footer():
    table = layer_table(REPORT)
    assert str(table.title) == "Net: per-layer sparsity"
    assert [c.header for c in table.columns] == ["layer", "op", "shape", "parameters", "kept",
                                                 "sparsity"]
    rows = [cells(line) for line in render(table) if "│" in line or "┃" in line]
    assert rows[0] == ["layer", "op", "shape", "parameters", "kept", "sparsity"]
    assert rows[1] == ["conv.weight", "conv2d", "8×3×3×3", "216", "54", "75.0% ████████░░"]
    assert rows[2] == ["fc.weight", "linear", "10×1000", "10,000", "1,000", "90.0% █████████░"]
    assert rows[3] == ["head.weight", "linear", "2×10", "20", "20", "0.0% ··········"]  # not pruned
    assert rows[4] == ["total", "10,236", "1,074", "89.5% █████████░"]


def test_layer_table_adds_effective_counts_after_a_collapse_pass():
    summary = {
        "layers": {"conv.weight": {"effective": 50, "empty": False, "disconnected": False},
                   "fc.weight": {"effective": 0, "empty": False, "disconnected": True}},
        "empty": [], "disconnected": ["fc.weight"],
        "totals": {"effective": 50, "kept": 1054, "effective_sparsity": 0.995},
    }
    report = {**REPORT, "pipeline": [{"name": "magnitude", "seconds": 0.1, "info": {}},
                                     {"name": "collapse", "seconds": 0.2, "info": summary}]}
    table = layer_table(report)
    assert table.columns[-1].header == "effective"
    rows = [cells(line) for line in render(table) if "│" in line or "┃" in line]
    assert rows[1][-1] == "50"
    assert rows[2][-1] == "0 disconnected"
    assert len(rows[3]) == 6  # no collapse record: an empty cell
    assert rows[4][-1] == "50"  # the footer
    lines = printed(report)
    assert ("effective: 50 of 1,054 kept weights on an input→output path (effective sparsity "
            "99.50%); disconnected: fc.weight") in lines


def test_print_report_summary_and_pipeline_lines():
    lines = printed(REPORT)
    assert "model: 2,838 of 12,000 parameters non-zero (76.4% sparse overall)" in lines
    assert not any(line.startswith(("pipeline:", "effective:")) for line in lines)


def test_print_report_lines_for_shrink_and_sparse_sizes():
    report = {**REPORT, "pipeline": [
        {"name": "magnitude", "seconds": 0.125, "info": {}},
        {"name": "shrink", "seconds": 1.5,
         "info": {"total": {"params": [12000, 3000], "flops": [48000, 8000]}}},
        {"name": "sparse", "seconds": 0.25,
         "info": {"total": {"params": [3000, 1000]}, "model_latency_us": [900.0, 300.0]}},
        {"name": "fold", "seconds": 0.0, "info": {"total": {"params": 5}}},  # not [before, after]
    ]}
    lines = printed(report)
    assert "shrink: parameters 12,000 -> 3,000 (4.00x smaller), FLOPs 48,000 -> 8,000 (6.00x fewer)" in lines
    assert "sparse: parameters 3,000 -> 1,000 (3.00x smaller), latency 900 -> 300 us (3.00x faster)" in lines
    assert not any(line.startswith("fold:") for line in lines)
    assert lines[-1] == "pipeline: magnitude 0.12s, shrink 1.50s, sparse 0.25s, fold 0.00s"


def test_a_real_report_renders(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.5, scope=local}, collapse", data=mlp_batches)
    report = build_report(graph)
    rows = [cells(line) for line in render(layer_table(report)) if "│" in line or "┃" in line]
    assert [r[0] for r in rows] == ["layer", "layers.0.weight", "layers.1.weight",
                                    "layers.2.weight", "total"]
    assert rows[1][:5] == ["layers.0.weight", "linear", "32×16", "512", "256"]
    assert rows[0][-1] == "effective"
    assert any(line.startswith("effective: ") for line in printed(report))


def test_display_tracks_passes_and_batches():
    display = Display(Console(record=True, width=80), enabled=False)
    hooks = display.hooks()
    assert hooks.on_pass == display.on_pass and hooks.track == display.track
    hooks.on_stage("loading the model")
    assert display.progress.tasks[0].description == "loading the model"
    hooks.on_pass("snip", 0, 3)
    hooks.on_pass("mask", 1, 3)
    passes = display.progress.tasks[1]
    assert (passes.total, passes.completed, passes.description) == (3, 1, "pass mask")
    assert display.progress.tasks[0].description == "running the pipeline"
    assert list(hooks.track(iter([1, 2, 3]), 3, "snip")) == [1, 2, 3]
    assert len(display.progress.tasks) == 2  # the batch task is removed when done
    seen = []
    assert display.hooks(on_epoch=seen.append).on_epoch is not None


def test_logging_to_shows_warnings_or_only_errors_and_restores_the_logger():
    logger = logging.getLogger("chop")
    before = (logger.handlers[:], logger.level, logger.propagate)
    for quiet, shown in ((False, ["a warning", "an error"]), (True, ["an error"])):
        console = Console(record=True, width=120, color_system=None)
        with logging_to(console, quiet):
            logger.info("some info")
            logger.warning("a warning")
            logger.error("an error")
        text = console.export_text()
        for message in ("some info", "a warning", "an error"):
            assert (message in text) == (message in shown), (quiet, message)
        assert (logger.handlers[:], logger.level, logger.propagate) == before


def test_logging_to_restores_the_logger_after_an_error():
    logger = logging.getLogger("chop")
    before = (logger.handlers[:], logger.level, logger.propagate)
    with pytest.raises(RuntimeError), logging_to(Console(), quiet=True):
        raise RuntimeError("boom")
    assert (logger.handlers[:], logger.level, logger.propagate) == before


def test_metrics_line_before_and_after():
    from chop.cli.display import metrics_line

    entry = {"metric": "accuracy", "batches": 4, "samples": 1024,
             "before": {"accuracy": 0.98828125, "loss": 0.05},
             "after": {"accuracy": 0.1015625, "loss": 3.2}}
    report = {**REPORT, "metrics": entry}
    assert metrics_line(report) == ("accuracy on 1,024 held-out samples: 98.8% before pruning, "
                                    "10.2% after (-88.7 points)")
    assert metrics_line(REPORT) is None
    assert "accuracy on 1,024 held-out samples: 98.8% before pruning" in "\n".join(printed(report))
    lm = {**entry, "metric": "perplexity", "before": {"perplexity": 20.0, "loss": 3.0},
          "after": {"perplexity": 50.0, "loss": 3.9}}
    assert metrics_line({**REPORT, "metrics": lm}).endswith("20.00 before pruning, 50.00 after "
                                                            "(2.50x)")
    own = {**entry, "metric": "loss", "before": {"loss": 0.5}, "after": {"loss": 0.75}}
    assert metrics_line({**REPORT, "metrics": own}).endswith("0.5 before pruning, 0.75 after "
                                                             "(+0.2500)")


def test_epoch_line_shows_the_task_metric():
    from chop.cli.display import epoch_line

    record = {"epoch": 3, "loss": 0.41234, "train_accuracy": 0.8512,
              "eval": {"accuracy": 0.8, "loss": 0.5}, "seconds": 1.26}
    assert epoch_line(record) == ("epoch 3: loss 0.4123, train accuracy 85.1%, eval accuracy "
                                  "80.0% (1.3s)")
    lm = {"epoch": 1, "loss": 3.2, "eval": {"perplexity": 23.456, "loss": 3.15}, "seconds": 0.5}
    assert epoch_line(lm) == "epoch 1: loss 3.2000, eval perplexity 23.46 (0.5s)"
    own = {"epoch": 1, "loss": 3.2, "eval": {"loss": 0.25}, "seconds": 0.5}
    assert epoch_line(own) == "epoch 1: loss 3.2000, eval loss 0.25 (0.5s)"
    assert epoch_line({**own, "eval": None}) == "epoch 1: loss 3.2000 (0.5s)"


def test_names_are_shown_as_written_never_as_markup():
    """A module named "[/]" or "[red]x" (an nn.ModuleDict key) is text: rich read it as
    markup, and "[/]" raised a MarkupError in the table and in chop report."""
    report = {**REPORT, "model": "Mod[/bold]",
              "layers": [layer("blocks.[/].weight", "linear", [10, 1000], 10000, 1000),
                         layer("blocks.[red]x.weight", "linear", [2, 10], 20, 20)],
              "hf": {"written": False, "reason": "shapes [/b] differ"}}
    lines = printed(report)
    assert lines[0].startswith("Mod[/bold]: per-layer sparsity")
    assert cells(lines[4])[0] == "blocks.[/].weight"
    assert cells(lines[5])[0] == "blocks.[red]x.weight"
    assert "hf/ not written: shapes [/b] differ" in lines


def test_a_narrow_terminal_keeps_layer_names_readable():
    """At 80 columns the layer column kept 4 characters, folding "conv1.weight" into
    "conv", "1.we", "ight"; it keeps at least 16."""
    long = {**REPORT, "layers": [layer("features.0.conv1.weight", "conv2d", [64, 3, 7, 7],
                                       9408, 941)]}
    rows = [cells(line) for line in render(layer_table(long), width=80)]
    names = [row[0] for row in rows if len(row) > 1 and row[1] == "conv2d"]
    assert len(names) == 1 and len(names[0]) >= 16
