"""The ``chop`` command line.

- ``chop --version``; ``chop passes`` lists every pass with its options and one line of doc.
- ``chop transform --config CONFIG CKPT [-o OUTDIR] [--set section.key=value ...] [--quiet]
  [--json] [--force] [--trust-checkpoint]`` runs a config's pipeline on a checkpoint and writes
  the outputs (see :mod:`chop.transform`), with a progress display and a per-layer table.
- ``chop train --config CONFIG CKPT_OR_OUTDIR [-o OUTDIR] [--set …] [--quiet] [--json]
  [--force] [--trust-checkpoint]`` trains the masked model (see :mod:`chop.train`) with a
  progress display and one line per epoch, then writes the same outputs.
- ``chop report PATH`` prints the per-layer table of an output folder, a ``.pt2`` or a
  checkpoint.

User errors (:class:`~chop.errors.ChopError`) print a short message and exit with status 2,
without a traceback. Anything else is a bug: a one-line message and status 3 (set
``CHOP_TRACEBACK=1`` to see the traceback). Ctrl-C exits with status 130 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.progress import TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import chop
from chop import registry
from chop.errors import ChopError


def _passes(args: argparse.Namespace, console: Console) -> int:
    for name, cls in registry.all_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        flow = "".join(
            f"; {label}: {', '.join(keys)}"
            for label, keys in (("requires", cls.requires), ("provides", cls.provides)) if keys
        )
        console.print(f"[bold]{name}[/bold] [dim]({cls.kind}{flow})[/dim]  {doc}", highlight=False)
        table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True, style="cyan")
        table.add_column()
        for option, kind, default, help_ in cls.option_table():
            table.add_row(f"    {option}={default!r}", kind, help_)
        if table.row_count:
            console.print(table, highlight=False)
    return 0


# -- the per-layer table -------------------------------------------------------------------------


def _bar(sparsity: float, pruned: bool, width: int = 10) -> Text:
    from chop.viz import colour

    if not pruned:
        return Text(f"{sparsity:6.1%} ", style="dim") + Text("·" * width, style="dim")
    filled = round(sparsity * width)
    return (Text(f"{sparsity:6.1%} ") + Text("█" * filled, style=colour(sparsity))
            + Text("░" * (width - filled), style="dim"))


def layer_table(report: dict[str, Any]) -> Table:
    """The per-layer table of a report: layer, op, shape, parameters, kept, sparsity, totals."""
    totals = report["totals"]
    table = Table(title=f"{report.get('model', 'model')}: per-layer sparsity", show_footer=True,
                  title_justify="left", header_style="bold", footer_style="bold")
    table.add_column("layer", footer="total", no_wrap=True)
    table.add_column("op", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("parameters", justify="right", footer=f"{totals['numel']:,}")
    table.add_column("kept", justify="right", footer=f"{totals['kept']:,}")
    table.add_column("sparsity", footer=_bar(totals["sparsity"], True), no_wrap=True)
    collapse = _collapse(report)
    if collapse is not None:  # a collapse pass ran: effective weights per layer
        table.add_column("effective", justify="right", no_wrap=True,
                         footer=f"{collapse['totals']['effective']:,}")
    for layer in report["layers"]:
        cells = [
            layer["name"], layer["op"], "×".join(map(str, layer["shape"])),
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


def _collapse(report: dict[str, Any]) -> dict[str, Any] | None:
    from passes.analysis.collapse import report_summary

    return report_summary(report)


def _print_report(report: dict[str, Any], console: Console) -> None:
    console.print(layer_table(report))
    totals = report["totals"]
    console.print(
        f"model: {totals['nonzero']:,} of {totals['parameters']:,} parameters non-zero "
        f"({1 - totals['nonzero'] / max(totals['parameters'], 1):.1%} sparse overall)",
        highlight=False,
    )
    collapse = _collapse(report)
    if collapse is not None:
        from passes.analysis.collapse import summary_line

        console.print(summary_line(collapse), highlight=False)
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
                          f"({p0 / max(p1, 1):.2f}x smaller){flops}{latency}", highlight=False)
    if steps:
        console.print("pipeline: " + ", ".join(f"{s['name']} {s['seconds']:.2f}s" for s in steps),
                      highlight=False)


# -- chop transform ------------------------------------------------------------------------------


class _Display:
    """Rich progress over the steps, the passes and each pass's batches (on stderr)."""

    def __init__(self, console: Console, enabled: bool):
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
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

    def track(self, items: Iterable, total: int | None, description: str) -> Iterator:
        task = self.progress.add_task(f"  {description} batches", total=total)
        try:
            for item in items:
                yield item
                self.progress.advance(task)
        finally:
            self.progress.remove_task(task)


@contextmanager
def _logging_to(console: Console, quiet: bool) -> Iterator[None]:
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


def _transform(args: argparse.Namespace, console: Console) -> int:
    from chop.transform import transform

    err = Console(stderr=True)
    display = _Display(err, enabled=not args.quiet and err.is_terminal)
    with _logging_to(err, args.quiet), display.progress:
        result = transform(
            args.config, args.checkpoint, outdir=args.outdir, overrides=args.set or (),
            force=args.force, trust_checkpoint=args.trust_checkpoint,
            track=display.track, on_pass=display.on_pass, on_stage=display.on_stage,
        )
    return _finish(args, result, console)


def _finish(args: argparse.Namespace, result: Any, console: Console) -> int:
    """Print what a transform or train run produced: the report as JSON, or the table and
    where the files went."""
    from chop.save import FILES

    if args.json:
        sys.stdout.write(json.dumps(result.report, indent=2) + "\n")
    elif not args.quiet:
        _print_report(result.report, console)
        shown = os.path.relpath(result.outdir) if result.outdir.is_relative_to(os.getcwd()) \
            else str(result.outdir)
        console.print(f"wrote [bold]{escape(shown)}[/bold]", highlight=False, soft_wrap=True)
        console.print("  " + ", ".join(FILES), highlight=False)
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from chop.train import train

    err = Console(stderr=True)
    shown_on = err if args.json else console  # keep stdout pure JSON with --json
    display = _Display(err, enabled=not args.quiet and err.is_terminal)

    def on_epoch(record: dict[str, Any]) -> None:
        if args.quiet:
            return
        evaluation = record["eval_accuracy"]
        shown_on.print(
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, train accuracy "
            f"{record['train_accuracy']:.1%}"
            + (f", eval accuracy {evaluation:.1%}" if evaluation is not None else "")
            + f" ({record['seconds']:.1f}s)",
            highlight=False,
        )

    with _logging_to(err, args.quiet), display.progress:
        result = train(
            args.config, args.source, outdir=args.outdir, overrides=args.set or (),
            force=args.force, trust_checkpoint=args.trust_checkpoint, track=display.track,
            on_pass=display.on_pass, on_stage=display.on_stage, on_epoch=on_epoch,
        )
    return _finish(args, result, console)


def _report(args: argparse.Namespace, console: Console) -> int:
    from chop.report import read_report

    report = read_report(args.path, trust=args.trust_checkpoint)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_report(report, console)
    return 0


def _output_options(parser: argparse.ArgumentParser, suffix: str, example: str) -> None:
    """The options ``transform`` and ``train`` share: where and how to write the outputs."""
    parser.add_argument("-o", "--outdir", metavar="OUTDIR",
                        help=f"output folder (default: a new <config-stem>{suffix} folder next "
                        "to CONFIG)")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help=f"override a config value, e.g. --set {example}")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--json", action="store_true", help="print the report as JSON to stdout")
    parser.add_argument("--force", action="store_true", help="replace OUTDIR if it is not empty")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a pickled whole model (runs code from the file: trusted "
                        "files only)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chop`` (subcommands register themselves here)."""
    parser = argparse.ArgumentParser(
        prog="chop", description="SNIP pruning for PyTorch, as a compiler pipeline over torch.fx."
    )
    parser.add_argument("--version", action="version", version=f"chop {chop.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("passes", help="list every pass with its options")
    p.set_defaults(func=_passes)

    t = sub.add_parser(
        "transform", help="prune a checkpoint with a TOML config and write the outputs",
        description="Run the pipeline of CONFIG on CKPT and write model.pt2, weights.safetensors, "
        "masks.safetensors, report.json, sparsity.html and graph.dot into OUTDIR.",
    )
    t.add_argument("--config", required=True, metavar="CONFIG", help="the TOML config")
    t.add_argument("checkpoint", metavar="CKPT",
                   help="a state dict (.pt/.pth/.ckpt/.bin, .safetensors) or a torch.export .pt2")
    _output_options(t, "-out", "passes.mask.sparsity=0.95")
    t.set_defaults(func=_transform)

    tr = sub.add_parser(
        "train", help="train a pruned model (a chop transform OUTDIR, or a checkpoint pruned "
        "with the config's pipeline first) and write the outputs",
        description="Train the masked model of CKPT_OR_OUTDIR with the [train] section of CONFIG "
        "(masks stay applied), report accuracy per epoch, and write the same files as chop "
        "transform into OUTDIR.",
    )
    tr.add_argument("--config", required=True, metavar="CONFIG", help="the TOML config")
    tr.add_argument("source", metavar="CKPT_OR_OUTDIR",
                    help="a chop transform output folder, or a checkpoint (the config's pipeline "
                    "runs first)")
    _output_options(tr, "-trained-out", "train.epochs=3")
    tr.set_defaults(func=_train)

    r = sub.add_parser("report", help="print the per-layer table of an output folder, .pt2 or "
                       "checkpoint")
    r.add_argument("path", metavar="PATH", help="an OUTDIR, a report.json, a .pt2 or a checkpoint")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--trust-checkpoint", action="store_true",
                   help="allow a pickled whole model (trusted files only)")
    r.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chop`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    console = Console()
    err = Console(stderr=True)
    try:
        return args.func(args, console)
    except ChopError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/bold red]: nothing was written", highlight=False)
        return 130
    except Exception as e:
        if os.environ.get("CHOP_TRACEBACK"):
            raise
        err.print(
            f"[bold red]internal error:[/bold red] {type(e).__name__}: {escape(str(e))}\n"
            "This is a bug in chop; rerun with CHOP_TRACEBACK=1 to see the traceback, and "
            "report it.",
            highlight=False, soft_wrap=True,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
