"""Benchmark exact global top-k selection: chop.kernels.select vs one concatenated copy.

Builds ``--numel`` float32 SNIP-like scores (|N(0,1)| times a per-layer scale,
10% exact zeros) split over 100 tensors of varied sizes, three of them larger
than 2**24 elements (torch.quantile's limit). Times, side by side in this
process (median of ``--repeats`` interleaved runs):

* ``kth_largest``: the exact threshold only (on one process: the bracket from a sample, one
  pass; see ``chop/kernels/select.py``);
* ``kth_largest (radix)``: the same with the bracket off, the radix passes alone (what
  processes that share a selection run, and the fallback when a bracket misses);
* ``keep_masks``: threshold plus the final boolean masks;
* ``torch.cat + torch.kthvalue``: the threshold from one concatenated copy (the
  cat is included, since a user needs it);
* ``cat+np.partition`` and ``cat+np.sort``: the same copy cut by numpy's introselect or
  sorted by numpy (what chop's bracket samples use on CPU, :func:`select._kth_smallest`).

``--cuts`` adds a second table: one cut of one tensor (what chop cuts: a small selection
whole, the bracket's sample and band) by ``torch.kthvalue``, ``np.partition``, ``np.sort``
and chop's own cut (:func:`select._direct_threshold`: from ``_PARTITIONED`` scores
:func:`select._cut`, which counts a block of equal values that a sample shows, then cuts the
threshold from the band of values that the sample brackets, the block left out, or from a copy
of a small side of the block; its copy and counts included) and the same cut always sorting,
at 20K–4M scores, with no zeros and with 90% zeros (pruned weights score alike), keeping 10%;
1 thread, best of ``--repeats`` timed loops (warm caches). Its last column times chop's cut and
the sorting one as a Pruner meets them, once per training step: each call alone, right after a
sweep over 64 MiB (the step's work in between evicts the caches), median of ``2 × --repeats +
1`` calls in alternating order.

``--masks`` adds a third table: the bool work around a selection, torch against numpy on the
same memory (what :func:`select.true_counts`, the small selections' comparisons and the
Pruner's check that no pruned weight came back use on CPU): counting the True entries of a
mask, comparing float scores with a threshold into a bool mask, and asking whether any entry
is True in one mask and False in another; at 20K–16M entries, this process's threads.

Peak extra memory is measured per method in a fresh subprocess, as the RSS
high-water mark after one run minus the RSS right after allocating the scores
(Linux VmHWM, reset via /proc/self/clear_refs; else ``ru_maxrss``). For
``keep_masks`` it includes the returned masks (1 byte per score). The
thresholds of every method are checked to agree.

Usage: ``python benchmarks/bench_select.py [--numel N] [--repeats R] [--threads T] [--cuts]
[--masks]``
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least  # noqa: E402

from chop.kernels import select  # noqa: E402
from chop.kernels.select import keep_masks, kth_largest  # noqa: E402

METHODS = ("kth_largest", "kth_largest (radix)", "keep_masks", "cat+kthvalue",
           "cat+np.partition", "cat+np.sort")


def build_scores(numel: int, seed: int) -> list[torch.Tensor]:
    """100 float32 tensors totalling ``numel`` elements, three of 20% each."""
    gen = torch.Generator().manual_seed(seed)
    big = [numel // 5] * 3
    weights = torch.rand(97, generator=gen) + 0.05
    rest = numel - sum(big)
    small = (weights / weights.sum() * rest).long().tolist()
    small[-1] += rest - sum(small)
    scores = []
    for i, n in enumerate(big[:1] + small[:48] + big[1:2] + small[48:] + big[2:]):
        s = torch.empty(n)
        for part in s.split(1 << 20):  # small temporaries, so the RSS baseline is just the scores
            torch.randn(part.shape, generator=gen, out=part).abs_().mul_(10.0 ** (i % 7 - 3))
            part[torch.rand(part.shape, generator=gen) < 0.1] = 0.0
        scores.append(s)
    return scores


def run_method(method: str, scores: list[torch.Tensor], k: int) -> float:
    """Runs one method and returns its threshold value."""
    if method == "kth_largest":
        return kth_largest(scores, k)[0]
    if method == "kth_largest (radix)":
        bracket, select._bracket = select._bracket, lambda *args: None
        try:
            return kth_largest(scores, k)[0]
        finally:
            select._bracket = bracket
    if method == "keep_masks":
        masks = keep_masks(scores, k)
        assert sum(int(m.count_nonzero()) for m in masks) == k
        return float("nan")
    flat = torch.cat([s.reshape(-1) for s in scores])
    j = flat.numel() - k  # 0-based rank from the smallest
    if method == "cat+np.partition":
        return np.partition(flat.numpy(), j)[j].item()
    if method == "cat+np.sort":
        return np.sort(flat.numpy())[j].item()
    return torch.kthvalue(flat, j + 1).values.item()


def cut_table(repeats: int) -> None:
    """Times one cut (the j-th smallest of one float32 tensor) three ways; see the module doc."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ways = {"torch.kthvalue": lambda x, j: torch.kthvalue(x, j + 1).values.item(),
            "np.partition": lambda x, j: np.partition(x.numpy(), j)[j].item(),
            "np.sort": lambda x, j: np.sort(x.numpy())[j].item(),
            # chop's cut, copy and counts included: a block of equal values a sample shows
            # counted, the band a sample brackets cut; and the same always sorting (as before
            # round 36)
            "chop": lambda x, j: select._direct_threshold([x], x.numel() - j, x.dtype)[1],
            "chop, sort only": _sorting_cut}
    print("\none cut of one tensor, 1 thread, keeping 10% (ms, best of "
          f"{repeats} loops)\n")
    print("| scores | zeros | " + " | ".join(ways) + " | kthvalue ÷ np.sort | chop ÷ sort only "
          "| chop ÷ sort only, cold |")
    print("|---:|---:|" + "---:|" * (len(ways) + 3))
    sweep = torch.zeros(1 << 24)  # 64 MiB
    for n in (20_000, 50_000, 131_072, 1 << 20, 1 << 22):
        for zeros in (0.0, 0.9):
            x = torch.randn(n, generator=gen).abs_()
            x[torch.rand(n, generator=gen) < zeros] = 0.0
            j, loops = n - n // 10, max(1, 2_000_000 // n)
            best, values = {}, set()
            for name, way in ways.items():
                values.add(way(x, j))
                best[name] = min(_loop_seconds(way, x, j, loops) for _ in range(repeats))
            assert len(values) == 1, values
            cold = _cold_seconds({w: ways[w] for w in ("chop", "chop, sort only")}, x, j,
                                 sweep, 2 * repeats + 1)
            cells = " | ".join(f"{best[w] * 1e3:.3f}" for w in ways)
            print(f"| {n:,} | {zeros:.0%} | {cells} | "
                  f"{best['torch.kthvalue'] / best['np.sort']:.2f} | "
                  f"{best['chop'] / best['chop, sort only']:.2f} | "
                  f"{cold['chop'] / cold['chop, sort only']:.2f} |")
    torch.set_num_threads(threads)


def _cold_seconds(ways: dict[str, Callable[[torch.Tensor, int], float]], x: torch.Tensor,
                  j: int, sweep: torch.Tensor, calls: int) -> dict[str, float]:
    """Median seconds of single calls of each way, each call right after ``sweep.add_(1)``
    (which evicts the caches), the ways in alternating order."""
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(calls):
        for name in (list(ways) if i % 2 else list(ways)[::-1]):
            sweep.add_(1)
            start = time.perf_counter()
            ways[name](x, j)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def _sorting_cut(x: torch.Tensor, j: int) -> float:
    """chop's cut with the partition turned off: one np.sort, whatever the scores."""
    saved, select._PARTITIONED = select._PARTITIONED, x.numel() + 1
    try:
        return select._direct_threshold([x], x.numel() - j, x.dtype)[1]
    finally:
        select._PARTITIONED = saved


def mask_table(repeats: int) -> None:
    """Times the bool work around a selection in torch and in numpy; see the module doc."""
    gen = torch.Generator().manual_seed(0)
    print(f"\nbool work on CPU, {torch.get_num_threads()} threads (ms, best of {repeats} loops)\n")
    print("| entries | work | torch | numpy | torch ÷ numpy |")
    print("|---:|---|---:|---:|---:|")
    for n in (20_000, 1 << 20, 1 << 24):
        x = torch.rand(n, generator=gen)
        old, new = x > 0.5, x > 0.4
        works = {
            "count True": (lambda: int(torch.count_nonzero(old)),
                           lambda: int(np.count_nonzero(old.numpy()))),
            "scores >= t": (lambda: torch.ge(x, 0.5), lambda: torch.from_numpy(x.numpy() >= 0.5)),
            "any True where False before": (
                lambda: bool(torch.gt(new.view(torch.uint8), old.view(torch.uint8)).any()),
                lambda: bool(np.greater(new.numpy(), old.numpy()).any())),
        }
        loops = max(1, 2_000_000 // n)
        for name, (in_torch, in_numpy) in works.items():
            assert torch.equal(torch.as_tensor(in_torch()), torch.as_tensor(in_numpy()))
            best = [min(_loop_seconds(lambda x, j, f=f: f(), x, 0, loops) for _ in range(repeats))
                    for f in (in_torch, in_numpy)]
            print(f"| {n:,} | {name} | {best[0] * 1e3:.3f} | {best[1] * 1e3:.3f} | "
                  f"{best[0] / best[1]:.2f} |")


def _loop_seconds(way: Callable[[torch.Tensor, int], float], x: torch.Tensor, j: int,
                  loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        way(x, j)
    return (time.perf_counter() - start) / loops


def reset_peak_rss() -> bool:
    """Returns freed heap to the OS, then resets the RSS high-water mark (Linux); False if unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # so freed build temporaries are not reused "for free"
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(reset: bool) -> float:
    """VmHWM if it could be reset, else the process-lifetime ``ru_maxrss``."""
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """Measures one method's peak extra RSS in this (fresh) process."""
    scores = build_scores(args.numel, args.seed)
    reset = reset_peak_rss()
    base = peak_rss_mib(reset)
    run_method(args.child, scores, int(args.keep * args.numel))
    print(json.dumps({"extra_mib": peak_rss_mib(reset) - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=at_least(1), default=100_000_000,
                        help="total number of scores")
    parser.add_argument("--repeats", type=at_least(1), default=3,
                        help="timed runs per method (median)")
    parser.add_argument("--keep", type=float, default=0.1, help="fraction of scores kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="torch intra-op threads (0: torch default)")
    parser.add_argument("--masks", action="store_true",
                        help="also time counts and comparisons of bool masks, torch vs numpy")
    parser.add_argument("--cuts", action="store_true",
                        help="also time one cut of one tensor by kthvalue, np.partition, np.sort")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.keep < 1:
        parser.error(f"--keep must be between 0 and 1 (exclusive), got {args.keep}")
    if int(args.keep * args.numel) < 1:
        parser.error(f"--keep {args.keep} of --numel {args.numel} keeps no score")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    scores = build_scores(args.numel, args.seed)
    k = int(args.keep * args.numel)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    thresholds: dict[str, float] = {}
    for _ in range(args.repeats):
        for method in METHODS:
            start = time.perf_counter()
            value = run_method(method, scores, k)
            times[method].append(time.perf_counter() - start)
            thresholds.setdefault(method, value)
    assert len({thresholds[m] for m in METHODS if m != "keep_masks"}) == 1, thresholds
    extra = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--numel", str(args.numel), "--keep", str(args.keep)]
        cmd += ["--seed", str(args.seed), "--threads", str(args.threads), "--child", method]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        extra[method] = json.loads(out.splitlines()[-1])["extra_mib"]

    score_mib = sum(s.numel() * s.element_size() for s in scores) / 2**20
    sizes = sorted((s.numel() for s in scores), reverse=True)
    print(f"scores: {args.numel:,} float32 in {len(scores)} tensors ({score_mib:.0f} MiB; "
          f"largest {sizes[0]:,}, smallest {sizes[-1]:,}); k = {k:,}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"threshold: {thresholds['kth_largest']!r} (identical for every method)\n")
    ref = statistics.median(times["cat+kthvalue"])
    print("| method | median ms | speedup vs kthvalue | peak extra MiB | scores MiB |")
    print("|---|---:|---:|---:|---:|")
    for method in METHODS:
        med = statistics.median(times[method])
        print(f"| {method} | {med * 1e3:.2f} | {ref / med:.1f}x | {extra[method]:.0f} | "
              f"{score_mib:.0f} |")
    if args.cuts:
        cut_table(args.repeats)
    if args.masks:
        mask_table(args.repeats)


if __name__ == "__main__":
    main()
