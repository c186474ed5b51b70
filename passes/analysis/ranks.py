"""Rank statistics for comparing two criteria's scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-d tensor, ties given their average rank (float64)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2  # mean of the ranks ends-count+1 .. ends
    result = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    result[order] = average[inverse]
    return result


def spearman(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Spearman rank correlation of two score lists over all their entries together (Pearson
    correlation of average ranks; NaN when either side is constant)."""
    x = ranks(torch.cat([t.detach().reshape(-1).double() for t in a]))
    y = ranks(torch.cat([t.detach().reshape(-1).double() for t in b]))
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")
