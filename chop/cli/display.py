"""What the terminal shows: the per-layer table, the summary lines, progress, and chop's log."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from chop.cli.spine import Hooks
from chop.cli.viz import colour
from chop.passes.analysis.collapse import report_summary, summary_line


def _bar(sparsity: float, pruned: bool, width: int = 10) -> Text:
    if not pruned:
        return Text(f"{sparsity:6.1%} ", style="dim") + Text("·" * width, style="dim")
    filled = round(sparsity * width)
    return (Text(f"{sparsity:6.1%} ") + Text("█" * filled, style=colour(sparsity))
            + Text("░" * (width - filled), style="dim"))


def layer_table(report: dict[str, Any]) -> Table:
    """The per-layer table of a report: layer, op, shape, parameters, kept, sparsity, totals,
    and the report's warnings under it."""
    totals = report["totals"]
    warnings = "\n".join(f"warning: {w}" for w in report.get("warnings") or ())
    # every name is shown as written: Text, never rich markup (a layer may be named "[/]")
    table = Table(title=Text(f"{report.get('model', 'model')}: per-layer sparsity"),
                  show_footer=True,
                  title_justify="left", header_style="bold", footer_style="bold",
                  caption=Text(warnings) if warnings else None, caption_justify="left",
                  caption_style="bold yellow")
    # long names wrap, not the numbers, but never into slivers on a narrow terminal
    longest = max((len(layer["name"]) for layer in report["layers"]), default=5)
    table.add_column("layer", footer="total", overflow="fold", min_width=min(16, longest))
    table.add_column("op", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("parameters", justify="right", footer=f"{totals['numel']:,}", no_wrap=True)
    table.add_column("kept", justify="right", footer=f"{totals['kept']:,}", no_wrap=True)
    table.add_column("sparsity", footer=_bar(totals["sparsity"], True), no_wrap=True)
    collapse = report_summary(report)
    if collapse is not None:  # a collapse pass ran: effective weights per layer
        table.add_column("effective", justify="right", no_wrap=True,
                         footer=f"{collapse['totals']['effective']:,}")
    for layer in report["layers"]:
        cells = [
            Text(layer["name"]), Text(layer["op"]), "×".join(map(str, layer["shape"])),
            f"{layer['numel']:,}", f"{layer['kept']:,}",
            _bar(layer["sparsity"], layer.get("pruned", True)),
        ]
        if collapse is not None:
            record = collapse["layers"].get(layer["name"])
            flag = next((k for k in ("empty", "disconnected") if record and record[k]), "")
            cells.append("" if record is None else
                         Text(f"{record['effective']:,}" + (f" {flag}" if flag else ""),
                              style="bold red" if flag else ""))
        table.add_row(*cells)
    return table


def _shown(metric: str, value: float) -> str:
    return {"accuracy": f"{value:.1%}", "perplexity": f"{value:,.2f}"}.get(metric, f"{value:.4g}")


def metrics_line(report: dict[str, Any]) -> str | None:
    """``accuracy on 1,024 held-out samples: 98.8% before pruning, 10.2% after (-88.6
    points)``, from the report's ``metrics``; None when it has none."""
    entry = report.get("metrics")
    if not isinstance(entry, dict):
        return None
    metric = entry["metric"]
    before, after = entry["before"][metric], entry["after"][metric]
    change = (f"{(after - before) * 100:+.1f} points" if metric == "accuracy" else
              f"{after / before:.2f}x" if metric == "perplexity" and before else
              f"{after - before:+.4f}")
    return (f"{metric} on {entry['samples']:,} held-out samples: {_shown(metric, before)} before "
            f"pruning, {_shown(metric, after)} after ({change})")


def epoch_line(record: dict[str, Any]) -> str:
    """One line per training epoch: the training loss and accuracy, the eval metric."""
    shown = [f"epoch {record['epoch']}: loss {record['loss']:.4f}"]
    if "train_accuracy" in record:
        shown.append(f"train accuracy {record['train_accuracy']:.1%}")
    for metric, value in (record.get("eval") or {}).items():
        if metric != "loss" or len(record["eval"]) == 1:
            shown.append(f"eval {metric} {_shown(metric, value)}")
    return ", ".join(shown) + f" ({record['seconds']:.1f}s)"


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(layer_table(report))
    totals = report["totals"]
    console.print(
        f"model: {totals['nonzero']:,} of {totals['parameters']:,} parameters non-zero "
        f"({1 - totals['nonzero'] / max(totals['parameters'], 1):.1%} sparse overall)",
        highlight=False, markup=False,
    )
    line = metrics_line(report)
    if line is not None:
        console.print(line, highlight=False, markup=False)
    history = (report.get("train") or {}).get("history") or []
    if history:
        console.print("trained: " + epoch_line(history[-1]), highlight=False, markup=False)
    hf = report.get("hf")
    if isinstance(hf, dict) and not hf.get("written", True):
        console.print(f"hf/ not written: {hf.get('reason')}", highlight=False, markup=False)
    collapse = report_summary(report)
    if collapse is not None:
        console.print(summary_line(collapse), highlight=False, markup=False)
    steps = report.get("pipeline", [])
    for step in steps:  # shrink and sparse report [before, after] sizes
        total = (step.get("info") or {}).get("total", {})
        if isinstance(total.get("params"), list):
            (p0, p1), (f0, f1) = total["params"], total.get("flops", (0, 0))
            flops = f", FLOPs {f0:,} -> {f1:,} ({f0 / max(f1, 1):.2f}x fewer)" if f0 else ""
            timed = total.get("model_latency_us") or (step.get("info") or {}).get("model_latency_us")
            latency = (f", latency {timed[0]:,.0f} -> {timed[1]:,.0f} us "
                       f"({timed[0] / max(timed[1], 1e-9):.2f}x faster)") if timed else ""
            console.print(f"{step['name']}: parameters {p0:,} -> {p1:,} "
                          f"({p0 / max(p1, 1):.2f}x smaller){flops}{latency}", highlight=False,
                          markup=False)
    if steps:
        console.print("pipeline: " + ", ".join(f"{s['name']} {s['seconds']:.2f}s" for s in steps),
                      highlight=False, markup=False)


class Display:
    """Rich progress over the steps, the passes and each pass's batches (on stderr)."""

    def __init__(self, console: Console, enabled: bool):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
            disable=not enabled,
        )
        self.step = self.progress.add_task("starting", total=None)
        self.passes: Any = None

    def on_stage(self, description: str) -> None:
        self.progress.update(self.step, description=description)

    def on_pass(self, p: Any, index: int, count: int) -> None:
        if self.passes is None:
            self.progress.update(self.step, description="running the pipeline")
            self.passes = self.progress.add_task("passes", total=count)
        self.progress.update(self.passes, completed=index, description=f"pass {p}")

    def hooks(self, **more: Any) -> Hooks:
        """This display as a command's :class:`~chop.cli.spine.Hooks`."""
        return Hooks(on_stage=self.on_stage, track=self.track, on_pass=self.on_pass, **more)

    def track(self, items: Iterable, total: int | None, description: str) -> Iterator:
        task = self.progress.add_task(f"  {description} batches", total=total)
        try:
            for item in items:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)


@contextmanager
def logging_to(console: Console, quiet: bool) -> Iterator[None]:
    """Show chop's warnings (errors only when quiet) on ``console``; restore the logger after."""
    logger = logging.getLogger("chop")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [RichHandler(console=console, show_time=False, show_path=False)]
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
