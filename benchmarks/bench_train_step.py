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
  pre-hook recomputes ``weight = weight_orig * weight_mask`` every step);
- ``floor: dense + one gradient pass``: the dense step plus one in-place pass over the
  gradients of the weights the masks cover (each multiplied by 1.0, read and written once),
  between backward and the optimizer step. Masking gradients in a pass of its own, as
  ``fast_masks`` does, costs at least that (and reads the masks as well); only a kernel that
  fuses the mask into the backward or the optimizer step could cost less.

Models: BERT-small (transformers ``BertForSequenceClassification``, hidden 512, 4 layers,
8 heads, intermediate 2048; 8×128 tokens), a ResNet-18-style CNN written here (torchvision
is not installed; BasicBlocks [2, 2, 2, 2], 64→512 channels, 32×32 inputs, batch 32) and, with
``--models mlp-4096``, an MLP with layers of an LLM's size (1024-4096-4096-4096-10, batch 64),
where multiplying gradients by their masks is most of what masking costs. Steps of
every variant are interleaved step by step, ``--rounds`` times, after ``--warmup`` steps each;
per-step medians are compared with the dense median. Target (issue 13): ≤ 1.05× dense.

``--memory`` adds each variant's peak memory during its steps: a fresh process per variant runs
``--warmup`` steps (Adam's state exists from then on), returns freed heap memory to the system
(glibc's ``malloc_trim``), resets the kernel's high-water mark of its resident memory
(``/proc/self/clear_refs``, Linux), runs ``--steps`` steps and reports the peak over the resident
memory before them: the memory a step needs beyond the model and its optimizer state
(tracemalloc does not see torch's allocator).

``--fused`` gives every variant torch's fused Adam. On CPU the default Adam's ``sqrt`` of its
second moment runs far slower on zeros, which every pruned entry's moment is (its gradient is
0), so with the default Adam the masked variants pay for that in the optimizer step; the fused
kernel does not.

``--reuse-freed-memory`` runs the process as ``chop train`` does, with glibc keeping freed
memory for reuse (:func:`chop.kernels.allocator.reuse_freed_memory`). Without it, every block
over 32 MiB (a 4096² weight's product with its mask, or its gradient) is fresh memory at each
step, and its page faults slow the dense step too, which makes every ratio smaller.

Usage: ``python benchmarks/bench_train_step.py [--models bert-small,resnet18] [--steps 20]
[--rounds 3] [--threads N] [--fused] [--memory] [--reuse-freed-memory]``
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import statistics
import subprocess
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
from arguments import (  # noqa: E402
    add_reuse_freed_memory,
    apply_reuse_freed_memory,
    at_least,
    percent,
    sparsity_arg,
)
from bench_snip import ResNet18  # noqa: E402  (the same ResNet-18 for 32×32 inputs)

TARGET = 1.05
VARIANTS = ("dense", "masked graph", "chop fast_masks", "torch prune (custom_from_mask)",
            "floor: dense + one gradient pass")
CHOP = VARIANTS[1:3]  # chop's own variants: the target applies to them, not to the baselines


def resnet18(batch: int = 32):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return ResNet18(), [(torch.randn(batch, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (batch,), generator=g)) for _ in range(2)]


def bert_small(batch: int = 8, seq: int = 128):
    torch.manual_seed(0)
    model, batches = bench_pruner.bert_small(batch, seq)  # the same BERT-small
    return model, batches[:2]


def mlp_4096(batch: int = 64):
    """Layers of an LLM's size (4096², 16.8M weights each), where multiplying a weight or a
    gradient by its mask costs most."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096), nn.GELU(),
                          nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 10))
    return model, [(torch.randn(batch, 1024, generator=g),
                    torch.randint(0, 10, (batch,), generator=g)) for _ in range(2)]


MODELS = {"bert-small": ("BERT-small (4×512, 8×128 tokens)", bert_small),
          "resnet18": ("ResNet-18-style CNN (32×32, batch 32)", resnet18),
          "mlp-4096": ("MLP 1024-4096-4096-4096-10 (batch 64)", mlp_4096)}


class Variant:
    """One model copy, its optimizer and how one step runs."""

    def __init__(self, name: str, forward, params, enter=None, fused: bool = False,
                 after_backward=None):
        self.name, self.forward, self.after_backward = name, forward, after_backward
        self.optimizer = torch.optim.Adam(params, lr=1e-4, fused=fused or None)
        self.context = enter(self.optimizer) if enter is not None else None
        if self.context is not None:
            self.context.__enter__()
        self.times: list[float] = []

    def step(self, inputs, targets) -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(logits_of(self.forward(inputs)), targets)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def variants(model: nn.Module, batches, sparsity: float, fused: bool = False) -> list[Variant]:
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
    floor = copy.deepcopy(model)
    floor.train()
    covered = [floor.get_parameter(name) for name in masks]

    def one_pass() -> None:  # what masking the gradients in a pass of their own reads and writes
        torch._foreach_mul_([p.grad for p in covered if p.grad is not None], 1.0)
    return [
        Variant(VARIANTS[0], lambda x: call(dense, x), dense.parameters(), fused=fused),
        Variant(VARIANTS[1], lambda x: call(masked.module, x), masked.module.parameters(),
                fused=fused),
        Variant(VARIANTS[2], lambda x: call(fast.module, x), fast.module.parameters(),
                enter=lambda opt: fast_masks(fast, opt), fused=fused),
        Variant(VARIANTS[3], lambda x: call(hooked, x), hooked.parameters(), fused=fused),
        Variant(VARIANTS[4], lambda x: call(floor, x), floor.parameters(), fused=fused,
                after_backward=one_pass),
    ]


def _status(key: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}: --memory needs Linux")


def peak_extra_mib(v: Variant, batches, warmup: int, steps: int) -> float:
    """The peak resident memory during ``steps`` steps of ``v`` (after ``warmup``), over the
    resident memory before them, in MiB."""
    for i in range(warmup):
        v.step(*batches[i % len(batches)])
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # hand freed heap memory back, so the steps show their own
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _status("VmRSS")
    for i in range(steps):
        v.step(*batches[i % len(batches)])
    return (_status("VmHWM") - before) / 1024


def memory_table(args: argparse.Namespace, keys: list[str]) -> None:
    """Each variant's :func:`peak_extra_mib`, one fresh process per variant."""
    print("\n| model | variant | peak extra MiB during the steps | − dense |")
    print("|---|---|---:|---:|")
    for key in keys:
        title = MODELS[key][0]
        peaks = []
        for index in range(len(VARIANTS)):
            command = [sys.executable, __file__, "--models", key, "--peak-of", str(index),
                       "--warmup", str(args.warmup), "--steps", str(args.steps),
                       "--sparsity", str(args.sparsity)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.fused:
                command.append("--fused")
            if args.reuse_freed_memory:
                command.append("--reuse-freed-memory")
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            peaks.append(float(out.split()[-1]))
        for name, peak in zip(VARIANTS, peaks):
            print(f"| {title} | {name} | {peak:.1f} | {peak - peaks[0]:+.1f} |", flush=True)


def sqrt_ms() -> tuple[float, float]:
    """Milliseconds of ``torch.sqrt`` over 2^20 float32 zeros and over 2^20 positive floats
    (best of 5 × 10 calls): the default Adam takes it of every second moment at every step,
    and a pruned entry's moment is zero."""
    out = torch.empty(1 << 20)

    def best(x: torch.Tensor) -> float:
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                torch.sqrt(x, out=out)
            runs.append((time.perf_counter() - start) / 10)
        return min(runs) * 1e3

    return best(torch.zeros(1 << 20)), best(torch.rand(1 << 20) + 0.5)


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-small,resnet18")
    parser.add_argument("--steps", type=at_least(1), default=20,
                        help="timed steps per variant per round")
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--sparsity", type=sparsity_arg, default=0.9)
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--fused", action="store_true",
                        help="torch's fused Adam for every variant (one kernel per parameter; "
                             "on CPU it does not slow down on the zero moments of pruned "
                             "entries, where the default Adam's sqrt does)")
    parser.add_argument("--memory", action="store_true",
                        help="also each variant's peak memory, in a fresh process per variant")
    add_reuse_freed_memory(parser)
    parser.add_argument("--peak-of", type=at_least(0), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_reuse_freed_memory(parser, args)
    keys, skipped = bench_pruner.checked(parser, args, MODELS)
    if args.peak_of is not None and args.peak_of >= len(VARIANTS):
        parser.error(f"--peak-of {args.peak_of}: a variant index from 0 to {len(VARIANTS) - 1}")
    if args.peak_of is not None and len(keys) != 1:
        parser.error("--peak-of measures one model: give one in --models")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of is not None:  # a child of --memory: one variant of one model
        model, batches = MODELS[keys[0]][1]()
        v = variants(model, batches, args.sparsity, args.fused)[args.peak_of]
        print(f"{peak_extra_mib(v, batches, args.warmup, args.steps):.3f}")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{percent(args.sparsity)} sparsity, Adam{' (fused)' if args.fused else ''}; "
          f"{args.steps} steps × {args.rounds} rounds, "
          f"interleaved step by step; "
          f"{'freed memory reused (as chop train runs); ' if args.reuse_freed_memory else ''}"
          f"load average {load()}\n")
    zeros, positive = sqrt_ms()
    print(f"torch.sqrt of 2^20 float32: {zeros:.3f} ms on zeros, {positive:.3f} ms on positive "
          "values (the default Adam's sqrt meets the zero moments of pruned entries)\n")
    for why in skipped.values():
        print(why + "\n")
    print("| model | variant | median step ms | × dense | target |")
    print("|---|---|---:|---:|---|")
    for key in keys:
        title, build = MODELS[key]
        model, batches = build()
        runs = variants(model, batches, args.sparsity, args.fused)
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
            verdict = "" if v.name not in CHOP else (
                f"≤ {TARGET:.2f} {'ok' if ratio <= TARGET else 'MISSED'}")
            print(f"| {title} | {v.name} | {median * 1e3:.1f} | {ratio:.3f} | {verdict} |",
                  flush=True)
        for v in runs:
            if v.context is not None:
                v.context.__exit__(None, None, None)
        print(f"| | load average after {title}: {load()} | | | |")
    if args.memory:
        memory_table(args, keys)


if __name__ == "__main__":
    main()
