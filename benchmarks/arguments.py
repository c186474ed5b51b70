"""Argument types the benchmark scripts share: a number out of range is a parser error that
names the option and the range, before anything runs (not a traceback from deep inside a
measurement, or an empty table)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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


def sparsity_arg(text: str) -> float:
    """An ``argparse`` type: a share of weights to prune, in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0.9 prunes 90%), got {value}")
    return value
