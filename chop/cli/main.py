"""The ``chop`` command line.

- ``chop --version``; ``chop passes`` lists every pass with its options and one line of doc.
- ``chop transform --config CONFIG CKPT [-o OUTDIR] [--set section.key=value ...] [--quiet]
  [--json] [--force] [--trust-checkpoint]`` runs a config's pipeline on a checkpoint or a
  Hugging Face model folder and writes the outputs (see :mod:`chop.cli.spine`), with a
  progress display, a per-layer table and the metric before and after. Under ``torchrun``
  the ranks split the scoring and rank 0 writes (:mod:`chop.cli.ranks`).
- ``chop train --config CONFIG CKPT_OR_OUTDIR [-o OUTDIR] [--set …] [--quiet] [--json]
  [--force] [--trust-checkpoint]`` trains the masked model (see :mod:`chop.cli.train`) with a
  progress display and one line per epoch, then writes the same outputs.
- ``chop report PATH`` prints the per-layer table of an output folder, a ``.pt2`` or a
  checkpoint.

``transform`` and ``train`` first make glibc keep freed memory for reuse
(:func:`~chop.kernels.allocator.reuse_freed_memory`; ``CHOP_MALLOC=system`` leaves it alone).

User errors (:class:`~chop.errors.ChopError`) print a short message and exit with status 2,
without a traceback. Anything else is a bug: a one-line message and status 3 (set
``CHOP_TRACEBACK=1`` to see the traceback). Ctrl-C (SIGINT) and SIGTERM, at any moment, unwind
the run so that its temporary files are removed, then print one line and exit with status 130
and 143; a second signal meanwhile is ignored so that the clean-up finishes. A signal that
arrives while a finalizer runs (a ``__del__``, a weakref callback), where Python cannot raise
it, is delivered again just after.
"""

from __future__ import annotations

import _thread
import argparse
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from chop.errors import ChopError, ReportError

if TYPE_CHECKING:  # rich, torch and the rest load only when a command runs: --help is instant
    from rich.console import Console


def _passes(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from chop.pipeline import registry

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


def _transform(args: argparse.Namespace, console: Console) -> int:
    from rich.console import Console

    from chop.cli.commands import transform
    from chop.cli.display import Display, logging_to
    from chop.cli.ranks import process_group
    from chop.kernels.allocator import reuse_freed_memory

    reuse_freed_memory()  # the steps' activations reuse freed memory (see its module doc)
    err = Console(stderr=True)
    with process_group() as (rank, world):
        quiet = args.quiet or rank != 0  # under torchrun rank 0 alone prints (errors: all)
        display = Display(err, enabled=not quiet and err.is_terminal)
        with logging_to(err, quiet), display.progress:
            result = transform(
                args.config, args.checkpoint, outdir=args.outdir, overrides=args.set or (),
                force=args.force, trust_checkpoint=args.trust_checkpoint, hooks=display.hooks(),
                rank=rank, world=world,
            )
    return _finish(args, result, console) if rank == 0 else 0


def _finish(args: argparse.Namespace, result: Any, console: Console) -> int:
    """Print what a transform or train run produced: the report as JSON, or the table and
    where the files went."""
    from rich.markup import escape

    from chop.cli.display import print_report
    from chop.cli.outputs import written
    from chop.cli.report import to_json

    if args.json:
        sys.stdout.write(to_json(result.report))
    elif not args.quiet:
        print_report(result.report, console)
        shown = os.path.relpath(result.outdir) if result.outdir.is_relative_to(os.getcwd()) \
            else str(result.outdir)
        console.print(f"wrote [bold]{escape(shown)}[/bold]", highlight=False, soft_wrap=True)
        console.print("  " + ", ".join(written(result.report)), highlight=False, markup=False)
    return 0


def _train(args: argparse.Namespace, console: Console) -> int:
    from rich.console import Console

    from chop.cli.commands import train
    from chop.cli.display import Display, epoch_line, logging_to
    from chop.cli.ranks import world
    from chop.kernels.allocator import reuse_freed_memory

    if world()[1] > 1:
        raise ChopError("chop train runs in one process; run it without torchrun (chop "
                        "transform is the command that splits its scoring over ranks)")
    reuse_freed_memory()
    err = Console(stderr=True)
    shown_on = err if args.json else console  # keep stdout pure JSON with --json
    display = Display(err, enabled=not args.quiet and err.is_terminal)

    def on_epoch(record: dict[str, Any]) -> None:
        if not args.quiet:
            shown_on.print(epoch_line(record), highlight=False, markup=False)

    with logging_to(err, args.quiet), display.progress:
        result = train(
            args.config, args.source, outdir=args.outdir, overrides=args.set or (),
            force=args.force, trust_checkpoint=args.trust_checkpoint,
            hooks=display.hooks(on_epoch=on_epoch),
        )
    return _finish(args, result, console)


def _report(args: argparse.Namespace, console: Console) -> int:
    from chop.cli.display import print_report
    from chop.cli.report import read_report, to_json

    report = read_report(args.path, trust=args.trust_checkpoint)
    if args.json:
        sys.stdout.write(to_json(report))
        return 0
    try:
        print_report(report, console)
    except Exception as e:  # a report.json is a file from anywhere: any value can be wrong
        if not (os.path.isdir(args.path) or args.path.endswith(".json")):
            raise  # a report chop just built from a model: a bug
        first = (str(e).strip().splitlines() or [""])[0]
        raise ReportError(
            f"{args.path}: the report is damaged or not written by chop ({type(e).__name__}: "
            f"{first}); run chop transform again to rewrite it, or pass the model file instead"
        ) from e
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
    parser.add_argument("--force", action="store_true",
                        help="replace OUTDIR if it holds only chop's own earlier outputs")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a pickled whole model, or a .pt2 that needs unpickling "
                        "(runs code from the file: trusted files only)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``chop`` (subcommands register themselves here)."""
    from importlib.metadata import version  # not at import: signals are handled sooner

    parser = argparse.ArgumentParser(
        prog="chop", description="SNIP pruning for PyTorch, as a compiler pipeline over torch.fx."
    )
    parser.add_argument("--version", action="version", version=f"chop {version('chop')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("passes", help="list every pass with its options")
    p.set_defaults(func=_passes)

    t = sub.add_parser(
        "transform", help="prune a checkpoint with a TOML config and write the outputs",
        description="Run the pipeline of CONFIG on CKPT and write model.pt2, weights.safetensors, "
        "masks.safetensors, report.json, sparsity.html and graph.dot (and hf/ for a model "
        "folder) into OUTDIR.",
    )
    t.add_argument("--config", required=True, metavar="CONFIG", help="the TOML config")
    t.add_argument("checkpoint", metavar="CKPT",
                   help="a state dict (.pt/.pth/.ckpt/.bin, .safetensors), a torch.export .pt2, "
                   "or a Hugging Face model folder (save_pretrained; never downloaded)")
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
                   help="allow a pickled whole model, or a .pt2 that needs unpickling (runs "
                   "code from the file: trusted files only)")
    r.set_defaults(func=_report)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised wherever the program is (as Python raises KeyboardInterrupt for SIGINT),
    so that every ``with`` and ``finally`` on the way out cleans up."""


def _on_signal(signum: int, frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # later signals must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


def _redeliver(previous: Callable[[Any], None], pending: list[threading.Timer],
               unraisable: Any) -> None:
    """``sys.unraisablehook`` while :func:`main` runs. Python runs a signal's handler wherever
    the main thread is, finalizers included; an exception raised in a finalizer cannot leave it,
    so Python prints it and goes on, and with both signals ignored by then the run would finish
    as if never stopped. So the handler is put back and, from a timer thread a moment later
    (after the finalizer, not inside this hook), the signal is delivered again (``pending``:
    the timers, which :func:`main` cancels when it ends). Every other unraisable exception goes
    to ``previous``."""
    error = unraisable.exc_value
    if (isinstance(error, (KeyboardInterrupt, Terminated))
            and threading.current_thread() is threading.main_thread()):
        signum = signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
        signal.signal(signum, _on_signal)
        timer = threading.Timer(0.01, _thread.interrupt_main, args=(signum,))
        timer.daemon = True
        pending.append(timer)
        timer.start()
        return
    previous(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chop`` console script; returns the exit status (see the module doc)."""
    saved: dict[int, Any] = {}
    show_traceback = bool(os.environ.get("CHOP_TRACEBACK"))
    hook, pending = sys.unraisablehook, []
    try:  # from the first line on: a signal while installing the handlers is caught too
        sys.unraisablehook = functools.partial(_redeliver, hook, pending)
        for sig in (signal.SIGINT, signal.SIGTERM):
            if (threading.current_thread() is threading.main_thread()
                    and signal.getsignal(sig) is not signal.SIG_IGN):  # e.g. SIGINT under nohup
                saved[sig] = signal.signal(sig, _on_signal)
        return _main(argv, show_traceback)
    except (KeyboardInterrupt, Terminated) as e:
        if show_traceback:
            raise
        what, code = (("interrupted", 130) if isinstance(e, KeyboardInterrupt)
                      else ("terminated", 143))
        sys.stderr.write(f"{what}: stopped; no partial output was left\n")
        return code
    finally:
        sys.unraisablehook = hook
        for timer in pending:
            timer.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _main(argv: Sequence[str] | None, show_traceback: bool) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True)
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None
    where = f"rank {rank}: " if rank is not None else ""  # under torchrun: which rank failed
    try:
        return args.func(args, Console())
    except ChopError as e:
        if show_traceback:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(where + str(e))}", highlight=False,
                  soft_wrap=True)
        return 2
    except Exception as e:  # a bug: one line, the traceback on request
        if show_traceback:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        err.print(
            f"[bold red]internal error:[/bold red] {escape(where)}{type(e).__name__}: "
            f"{escape(first)} — this is "
            "a bug in chop; rerun with CHOP_TRACEBACK=1 to see the traceback, and report it.",
            highlight=False, soft_wrap=True,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
