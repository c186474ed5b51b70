"""Argument types and options the benchmark scripts share: a number out of range (or an option
that cannot take effect here) is a parser error that names the option, before anything runs
(not a traceback from deep inside a measurement, or an empty table)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from chop.kernels.allocator import reuse_freed_memory


def at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: a whole number ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"whole number >= {low}"  # what argparse names in its own messages
    return parse


def number_at_least(low: float, *, inclusive: bool = True) -> Callable[[str], float]:
    """An ``argparse`` type: a finite number ``>= low`` (``> low`` when not ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f"at least {low:g}" if inclusive else f"more than {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} (a finite number), got {text}")
        return value

    parse.__name__ = f"number {'>=' if inclusive else '>'} {low:g}"
    return parse


def sparsity_arg(text: str) -> float:
    """An ``argparse`` type: a share of weights to prune, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0.9 prunes 90%), got {value}")
    return value


def unique(values: list) -> list:
    """``values`` without repeats, in their first order (``--batches 1 1`` measures batch 1 once:
    tables keyed by the value would otherwise lose or misalign a column)."""
    return list(dict.fromkeys(values))


def share(value: float) -> str:
    """A sparsity for a table cell: two decimals, or all it needs (0.999, not 1.00)."""
    text = f"{value:.2f}"
    return text if float(text) == value else str(value)


def percent(value: float) -> str:
    """A sparsity as a percentage: whole, or with the decimals it needs (99.9%, not 100%)."""
    text = f"{value:.0%}"
    return text if float(text[:-1]) / 100 == value else f"{value * 100:.6g}%"


BERT_POSITIONS = 512  # BertConfig().max_position_embeddings


def check_bert_seq(parser: argparse.ArgumentParser, seq: int) -> None:
    """A parser error when BERT-base would be given more tokens than it has positions."""
    if seq > BERT_POSITIONS:
        parser.error(f"--seq {seq}: BERT-base takes at most {BERT_POSITIONS} tokens "
                     "(its max_position_embeddings)")


def add_reuse_freed_memory(parser: argparse.ArgumentParser) -> None:
    """``--reuse-freed-memory``: run with glibc keeping freed memory for reuse, as the chop
    command line does (see ``benchmarks/bench_allocator.py``); :func:`apply_reuse_freed_memory`
    turns it on."""
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="first call chop.kernels.allocator.reuse_freed_memory(), as the "
                             "chop command line does (see benchmarks/bench_allocator.py)")


def apply_reuse_freed_memory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With ``--reuse-freed-memory``, turn the setting on; a parser error where it cannot be
    (not glibc, or the environment already chose how the allocator behaves)."""
    if args.reuse_freed_memory and not reuse_freed_memory():
        parser.error("--reuse-freed-memory: reuse_freed_memory() did nothing here (not glibc, "
                     "or the environment chose the allocator)")
