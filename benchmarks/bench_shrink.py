"""Benchmark ``shrink``: CPU latency of shrunk CNNs against the dense ones, next to the FLOP
reduction, with ``fold-bn`` and ``channels-last`` on top, and Torch-Pruning side by side.

Models (``--models``): a VGG-style CNN with BatchNorm (``--widths``, 32×32 inputs) and
ResNet-50 (built here as torchvision builds it, 25.6M parameters, 224×224 inputs). Each is
traced, the lowest-scoring half (``--sparsity``) of every prunable channel group is removed
(random saliency, scored with ``group_scores``; per group, i.e. ``scope=local``), masked with
``group_masks`` + ``insert_mask`` and shrunk; the shrunk output is checked against the masked
one, and ``fold-bn`` / ``channels-last`` check theirs against the shrunk graph.

Variants, timed interleaved (each repeat runs every variant once, in turn; medians; no_grad,
eval mode): ``dense`` (the traced graph), ``dense+fold-bn+cl`` (the dense graph given the same
export passes: what an unpruned model gets from them), ``shrunk``, ``shrunk+fold-bn``,
``shrunk+fold-bn+cl`` (channels-last), and ``torch-pruning``: the eager model pruned by
Torch-Pruning's ``MetaPruner`` at the same per-layer ratio (``ignored_layers`` = the classifier,
as in its examples), when ``torch_pruning`` is importable (run this script with a Python that
has it: a separate venv with ``pip install torch-pruning`` and chop installed).

Speedup = dense time ÷ variant time; "÷ FLOPs" divides it by the conv/linear FLOP reduction.
Target (issue 13): ≥ 0.8 at batch 32 for both models, and the shrunk ResNet-50 at least as fast
as Torch-Pruning's.

Usage: ``python benchmarks/bench_shrink.py [--models vgg resnet50] [--batches 1 32]
[--repeats 10] [--threads N] [--stat median|min] [--reuse-freed-memory]``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import (  # noqa: E402
    add_reuse_freed_memory,
    apply_reuse_freed_memory,
    at_least,
    percent,
    sparsity_arg,
    unique,
)

import chop  # noqa: E402
from chop.ir import meta  # noqa: E402
from chop.ir.masks import insert_mask  # noqa: E402
from chop.kernels.timing import interleaved_seconds  # noqa: E402
from chop.passes.analysis.channel_groups import channel_groups  # noqa: E402
from chop.passes.analysis.group_select import group_masks, group_scores  # noqa: E402
from chop.passes.export.shrink import shrink  # noqa: E402


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


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (v1.5: the stride on the 3×3 conv)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """torchvision's ``resnet50()`` (25,557,032 parameters), built here: torchvision is optional."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
                cin = width * 4
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(model: nn.Module, size: int, sparsity: float, seed: int) -> dict:
    """The graphs of every variant, the FLOP/parameter report of shrink, and Torch-Pruning's."""
    model.eval()
    x = torch.randn(2, 3, size, size)
    data = [(torch.randn(3, 3, size, size), torch.zeros(3, dtype=torch.long))]
    dense = chop.trace(model, (x,)).eval()
    graph = dense.copy()
    g = torch.Generator().manual_seed(seed)
    for node in graph.weight_nodes():
        meta.entries(node)["saliency"] = torch.rand(graph.parameter(node).shape, generator=g)
    groups = channel_groups(graph)
    keep = {}
    for gid, score in group_scores(graph, groups).items():
        prunable = groups[gid].prunable
        drop = round(sparsity * int(prunable.sum()))
        if drop:
            decision = torch.ones(groups[gid].size, dtype=torch.bool)
            decision[score.masked_fill(~prunable, float("inf")).argsort()[:drop]] = False
            keep[gid] = decision
    for name, mask in group_masks(graph, groups, keep).items():
        insert_mask(graph, graph.weight_node(name), mask)
    graph.recompile()
    masked = graph.copy().eval()
    report = shrink(graph)
    check = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(graph(check), masked(check), rtol=1e-4, atol=1e-4)
    variants = {"dense": dense, "shrunk": graph}
    optimised = dense.copy().eval()
    chop.run(optimised, "fold-bn, channels-last", data=data)  # each pass checks its outputs
    variants["dense+fold-bn+cl"] = optimised
    folded = graph.copy().eval()
    chop.run(folded, "fold-bn", data=data)
    variants["shrunk+fold-bn"] = folded
    last = folded.copy().eval()
    chop.run(last, "channels-last", data=data)
    variants["shrunk+fold-bn+cl"] = last
    pruned = torch_pruning(model, x, sparsity)
    if pruned is not None:
        variants["torch-pruning"] = pruned[0]
    return {"variants": variants, "report": report, "tp_params": pruned and pruned[1]}


def torch_pruning(model: nn.Module, x: torch.Tensor, sparsity: float) -> tuple[nn.Module, int] | None:
    """``model`` pruned by Torch-Pruning at ``sparsity`` per layer, and its parameter count; None
    when torch_pruning is not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    pruned = copy.deepcopy(model).eval()
    classifier = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=sparsity, ignored_layers=[classifier])
    pruner.step()
    return pruned.eval(), sum(p.numel() for p in pruned.parameters())


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg", "resnet50"], choices=["vgg", "resnet50"])
    parser.add_argument("--widths", type=at_least(1), nargs="+",
                        default=[64, 64, 128, 128, 256, 256])
    parser.add_argument("--sparsity", type=sparsity_arg, default=0.5)
    parser.add_argument("--batches", type=at_least(1), nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=at_least(1), default=10)
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic over the repeats (min: least disturbed by other load)")
    add_reuse_freed_memory(parser)
    args = parser.parse_args()
    if "vgg" in args.models and len(args.widths) > 11:
        parser.error(f"--widths: at most 11 layers, got {len(args.widths)} (a 2×2 max-pool "
                     "follows every second one, and the inputs are 32×32)")
    args.models, args.batches = unique(args.models), unique(args.batches)  # one column each
    apply_reuse_freed_memory(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torch_pruning as tp
        have_tp = f"Torch-Pruning {tp.__version__}"
    except ImportError:
        have_tp = "Torch-Pruning not installed (its column is left out)"
    big_repeats = min(args.repeats, max(3, args.repeats // 2))  # batches over 32 32×32 images
    fewer = (f" ({big_repeats} for batches with more pixels than 32 images of 32×32)"
             if big_repeats < args.repeats else "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{have_tp}; {percent(args.sparsity)} of each channel group removed; "
          f"{'freed memory reused; ' if args.reuse_freed_memory else ''}{args.stat} of "
          f"{args.repeats} interleaved repeats{fewer}; load average {load()}\n")
    for name in args.models:
        torch.manual_seed(args.seed)
        model, size = (VGG(args.widths), 32) if name == "vgg" else (ResNet50(), 224)
        built = build(model, size, args.sparsity, args.seed)
        flops, params = built["report"]["total"]["flops"], built["report"]["total"]["params"]
        flop_ratio = flops[0] / flops[1]
        tp_params = f"; Torch-Pruning: {built['tp_params']:,} parameters" if built["tp_params"] else ""
        print(f"### {name} ({size}×{size})\n\nparameters {params[0]:,} → {params[1]:,} "
              f"({params[0] / params[1]:.2f}×){tp_params}; conv/linear FLOPs per image "
              f"{flops[0]:,} → {flops[1]:,} ({flop_ratio:.2f}×)\n")
        variants = built["variants"]
        times = {}
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            repeats = big_repeats if batch * size * size > 32 * 32 * 32 else args.repeats
            times[batch] = interleaved_seconds({k: (lambda v=v, x=x: v(x)) for k, v in variants.items()},
                                               repeats=repeats, warmup=1, statistic=args.stat)
        print("| variant | " + " | ".join(f"batch {b}: ms | speedup | ÷ FLOPs" for b in args.batches)
              + " |")
        print("|---|" + "---:|---:|---:|" * len(args.batches))
        for k in variants:
            cells = []
            for t in times.values():
                speedup = t["dense"] / t[k]
                ratio = speedup if k.startswith("dense") else speedup / flop_ratio  # dense: FLOPs 1×
                cells += [f"{t[k] * 1e3:.1f}", f"{speedup:.2f}×", f"{ratio:.2f}"]
            print(f"| {k} | " + " | ".join(cells) + " |")
        print(f"\nload average after {name}: {load()}\n")


if __name__ == "__main__":
    main()
