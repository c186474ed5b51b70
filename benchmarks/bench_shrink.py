"""Benchmark ``shrink``: CPU latency of a shrunk VGG-style model against the dense one, next to
the FLOP reduction.

Builds a VGG-style CNN with BatchNorm (``--widths``, 32×32 inputs), traces it, removes the
lowest-scoring half of every prunable channel group (random saliency, scored with
``group_scores``; ``--sparsity`` changes the fraction), masks with ``group_masks`` +
``insert_mask``, shrinks, and checks the shrunk output against the masked one. Then times the
dense graph, the masked graph and the shrunk graph (all fx GraphModules in eval mode, no_grad),
interleaved: each repeat runs every variant once in turn, and the table reports medians.

Target (issue 4): speedup >= 0.8 × the FLOP ratio at 50% channel sparsity.

Usage: ``python benchmarks/bench_shrink.py [--batches 1 32] [--repeats 30] [--threads N]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chop  # noqa: E402
from chop import meta  # noqa: E402
from chop.passes.analysis.channel_groups import channel_groups  # noqa: E402
from chop.passes.analysis.group_select import group_masks, group_scores  # noqa: E402
from chop.passes.export.shrink import shrink  # noqa: E402
from chop.ir.masks import insert_mask  # noqa: E402


class VGG(nn.Module):
    """VGG-style: (conv3×3-BN-ReLU) ×2 then max-pool, per stage; global pool; two linears."""

    def __init__(self, widths: list[int], classes: int = 100):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(cin * 4 * 4, 512), nn.ReLU(), nn.Linear(512, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 4)
        return self.classifier(torch.flatten(x, 1))


def build(widths: list[int], sparsity: float, seed: int) -> tuple[chop.Graph, chop.Graph, chop.Graph, dict]:
    """Dense, masked and shrunk graphs of the same model, plus shrink's report."""
    torch.manual_seed(seed)
    model = VGG(widths).eval()
    x = torch.randn(2, 3, 32, 32)
    dense = chop.trace(model, (x,)).eval()
    graph = chop.trace(model, (x,)).eval()
    g = torch.Generator().manual_seed(seed)
    for node in graph.weight_nodes():
        meta.entries(node)["saliency"] = torch.rand(graph.parameter(node).shape, generator=g)
    groups = channel_groups(graph)
    keep = {}
    for gid, score in group_scores(graph, groups).items():
        prunable = groups[gid].prunable
        drop = int(round(sparsity * int(prunable.sum())))
        if drop:
            decision = torch.ones(groups[gid].size, dtype=torch.bool)
            decision[score.masked_fill(~prunable, float("inf")).argsort()[:drop]] = False
            keep[gid] = decision
    for name, mask in group_masks(graph, groups, keep).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    masked = chop.trace(model, (x,)).eval()
    for name, mask in group_masks(masked, channel_groups(masked), keep).items():
        insert_mask(masked, masked.weight_node(name), mask)
    masked.recompile()
    report = shrink(graph)
    check = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(graph(check), masked(check), rtol=1e-4, atol=1e-4)
    return dense, masked, graph, report


def time_interleaved(variants: dict[str, chop.Graph], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each variant, running them in turn every repeat."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for graph in variants.values():  # warm up
            for _ in range(3):
                graph(x)
        for _ in range(repeats):
            for name, graph in variants.items():
                start = time.perf_counter()
                graph(x)
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 64, 128, 128, 256, 256])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, masked, shrunk, report = build(args.widths, args.sparsity, args.seed)
    flops, params = report["total"]["flops"], report["total"]["params"]
    flop_ratio = flops[0] / flops[1]
    print(f"VGG widths {args.widths}, 32×32 inputs, {args.sparsity:.0%} of each channel group "
          f"removed, {torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats\n")
    print(f"parameters {params[0]:,} → {params[1]:,} ({params[0] / params[1]:.2f}×); "
          f"conv/linear FLOPs per image {flops[0]:,} → {flops[1]:,} ({flop_ratio:.2f}×)\n")
    print("| batch | dense ms | masked ms | shrunk ms | speedup | FLOP ratio "
          "| speedup / FLOP ratio | ≥ 0.8 |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for batch in args.batches:
        x = torch.randn(batch, 3, 32, 32)
        t = time_interleaved({"dense": dense, "masked": masked, "shrunk": shrunk}, x, args.repeats)
        speedup = t["dense"] / t["shrunk"]
        ratio = speedup / flop_ratio
        print(f"| {batch} | {t['dense'] * 1e3:.2f} | {t['masked'] * 1e3:.2f} | {t['shrunk'] * 1e3:.2f} "
              f"| {speedup:.2f}× | {flop_ratio:.2f}× | {ratio:.2f} | {'yes' if ratio >= 0.8 else 'no'} |")
    print("\nper layer (params, FLOPs per image: before → after):")
    for name, layer in report["layers"].items():
        print(f"  {name:24s} params {layer['params'][0]:>9,} → {layer['params'][1]:>9,}   "
              f"FLOPs {layer['flops'][0]:>12,} → {layer['flops'][1]:>12,}")


if __name__ == "__main__":
    main()
