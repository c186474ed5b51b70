"""Wall-clock timing of calls, for kernel choices and the latency figures of exports."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch


def median_seconds(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` calls, under no_grad."""
    return interleaved_seconds({"fn": fn}, repeats, warmup)["fn"]


def interleaved_seconds(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3, inner: int = 1,
    statistic: Literal["median", "min"] = "median",
) -> dict[str, float]:
    """Median (or ``min``: the round least disturbed by other processes) wall time per call
    of each function, under no_grad: after ``warmup`` calls of each, every one of the
    ``repeats`` rounds calls each function ``inner`` times in turn, so that load from other
    processes hits them alike and their ratios stay fair. Each round calls the functions in a
    new order (a shuffle seeded with 0, so runs repeat), so that none always runs right after
    the same other one: a function that evicts the caches (a dense weight of 64 MB) or leaves
    the thread pool spinning would otherwise always slow down the same successor."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        names = list(fns)
        for _ in range(repeats):
            order.shuffle(names)
            for name in names:
                fn = fns[name]
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - start) / inner)
    reduce = statistics.median if statistic == "median" else min
    return {name: reduce(times) for name, times in samples.items()}
