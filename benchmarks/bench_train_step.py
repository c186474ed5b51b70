"""What does training a masked model cost over training the dense one?

One training step is forward, cross-entropy, backward and an Adam step (then ``zero_grad``).
Variants, each on its own copy of the same model, 90% of the linear/conv weights pruned
(magnitude per layer, the same masks for every masked variant):

- ``dense``: the eager ``nn.Module``, nothing pruned — the baseline;
- ``masked graph``: the chop graph with its ``mul(weight, mask)`` nodes (what ``chop train``
  ran before ``fast_masks``);
- ``chop fast_masks``: the same graph inside :func:`chop.training.loop.fast_masks` (masks kept
  in the weights: gradients masked in place, weights re-masked after the step);
- ``torch prune``: ``torch.nn.utils.prune.custom_from_mask`` on the eager module (a forward
  pre-hook recomputes ``weight = weight_orig * weight_mask`` every step).

Models: BERT-small (transformers ``BertForSequenceClassification``, hidden 512, 4 layers,
8 heads, intermediate 2048; 8×128 tokens) and a ResNet-18-style CNN written here (torchvision
is not installed; BasicBlocks [2, 2, 2, 2], 64→512 channels, 32×32 inputs, batch 32). Steps of
every variant are interleaved step by step, ``--rounds`` times, after ``--warmup`` steps each;
per-step medians are compared with the dense median. Target (issue 13): ≤ 1.05× dense.

Peak memory is not measured here: tracemalloc does not see torch's allocator, and ru_maxrss of
one process holding all the variants mixes them (run one variant per process to compare it).

Usage: ``python benchmarks/bench_train_step.py [--models bert-small,resnet18] [--steps 20]
[--rounds 3] [--threads N]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import chop  # noqa: E402
from chop.ir.graph import trace_inputs  # noqa: E402
from chop.ir.masks import current_masks  # noqa: E402
from chop.pipeline.batches import call, logits_of  # noqa: E402
from chop.training.loop import fast_masks  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_pruner  # noqa: E402
from bench_snip import ResNet18  # noqa: E402  (the same ResNet-18 for 32×32 inputs)

TARGET = 1.05


def resnet18(batch: int = 32):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return ResNet18(), [(torch.randn(batch, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (batch,), generator=g)) for _ in range(2)]


def bert_small(batch: int = 8, seq: int = 128):
    torch.manual_seed(0)
    model, batches = bench_pruner.bert_small(batch, seq)  # the same BERT-small
    return model, batches[:2]


MODELS = {"bert-small": ("BERT-small (4×512, 8×128 tokens)", bert_small),
          "resnet18": ("ResNet-18-style CNN (32×32, batch 32)", resnet18)}


class Variant:
    """One model copy, its optimizer and how one step runs."""

    def __init__(self, name: str, forward, params, enter=None):
        self.name, self.forward = name, forward
        self.optimizer = torch.optim.Adam(params, lr=1e-4)
        self.context = enter(self.optimizer) if enter is not None else None
        if self.context is not None:
            self.context.__enter__()
        self.times: list[float] = []

    def step(self, inputs, targets) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(logits_of(self.forward(inputs)), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def variants(model: nn.Module, batches, sparsity: float) -> list[Variant]:
    example = batches[0][0]
    dense = copy.deepcopy(model)
    dense.train()
    masked = trace_inputs(copy.deepcopy(model), example)
    chop.run(masked, f"magnitude, mask{{sparsity={sparsity}, scope=local}}")
    masks = current_masks(masked)
    fast = masked.copy()
    hooked = copy.deepcopy(model)
    hooked.train()
    for name, mask in masks.items():
        owner_name, _, attr = name.rpartition(".")
        prune.custom_from_mask(hooked.get_submodule(owner_name), attr, mask)
    masked.train()
    fast.train()
    return [
        Variant("dense", lambda x: call(dense, x), dense.parameters()),
        Variant("masked graph", lambda x: call(masked.module, x), masked.module.parameters()),
        Variant("chop fast_masks", lambda x: call(fast.module, x), fast.module.parameters(),
                enter=lambda opt: fast_masks(fast, opt)),
        Variant("torch prune (custom_from_mask)", lambda x: call(hooked, x),
                hooked.parameters()),
    ]


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-small,resnet18")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.sparsity:.0%} sparsity, Adam; {args.steps} steps × {args.rounds} rounds, "
          f"interleaved step by step; load average {load()}\n")
    print("| model | variant | median step ms | × dense | target |")
    print("|---|---|---:|---:|---|")
    for key in args.models.split(","):
        title, build = MODELS[key]
        model, batches = build()
        runs = variants(model, batches, args.sparsity)
        for v in runs:
            for i in range(args.warmup):
                v.step(*batches[i % len(batches)])
        for r in range(args.rounds):
            for i in range(args.steps):
                order = runs[(i + r) % len(runs):] + runs[:(i + r) % len(runs)]
                for v in order:
                    v.times.append(v.step(*batches[i % len(batches)]))
        base = statistics.median(runs[0].times)
        for v in runs:
            median = statistics.median(v.times)
            ratio = median / base
            verdict = "" if v.name == "dense" else (
                f"≤ {TARGET:.2f} {'ok' if ratio <= TARGET else 'MISSED'}")
            print(f"| {title} | {v.name} | {median * 1e3:.1f} | {ratio:.3f} | {verdict} |",
                  flush=True)
        for v in runs:
            if v.context is not None:
                v.context.__exit__(None, None, None)
        print(f"| | load average after {title}: {load()} | | | |")


if __name__ == "__main__":
    main()
