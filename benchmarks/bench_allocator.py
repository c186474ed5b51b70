"""What glibc's handling of large freed blocks costs a CPU step, with and without
:func:`chop.kernels.allocator.reuse_freed_memory` (which ``chop transform`` and ``chop train``
call first), side by side.

The allocator belongs to the process, so each measurement is a fresh process: for every
workload and round, one process as glibc comes (``default``) and one that called
``reuse_freed_memory()`` first (``reuse``), in alternating order across rounds. Each process
runs the workload once to warm up, then ``--calls`` times, and reports the median seconds per
call, the minor page faults per call (``ru_minflt``: first touches of fresh pages), its peak
resident memory (``ru_maxrss``, model and imports included) and its resident memory after the
last call (``/proc/self/statm``: what it keeps). The table gives the medians over
``--rounds`` processes of each setting and ``default ÷ reuse`` (> 1: reuse is faster).

Workloads (``--workloads``), on ResNet-50 as torchvision builds it (``bench_shrink.py``),
224×224 images, random weights:

- ``forward``: eval-mode forward under ``no_grad``, batch ``--batch-forward`` (32);
- ``train``: a training step (forward, cross-entropy, backward, SGD) in train mode, batch
  ``--batch-train`` (16);
- ``structured``: what ``chop transform`` runs for channel pruning: ``chop.trace`` then
  ``chop.run(graph, "snip, mask{granularity=channel, sparsity=0.5}, shrink", data=...)`` on
  batch ``--batch-train`` (16), a fresh copy of the model per call; seconds include the trace.

Usage: ``python benchmarks/bench_allocator.py [--workloads forward train structured]
[--rounds 2] [--calls 3]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "reuse")
WORKLOADS = ("forward", "train", "structured")


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(setting: str, workload: str, args: argparse.Namespace) -> dict:
    """One process's measurement (run with ``--worker SETTING WORKLOAD``)."""
    applied = None
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if setting == "reuse":
        from chop.kernels.allocator import reuse_freed_memory

        applied = reuse_freed_memory()
    import torch
    import torch.nn.functional as F
    from bench_shrink import ResNet50

    torch.manual_seed(0)
    model = ResNet50()
    if workload == "forward":
        model.eval()
        x = torch.randn(args.batch_forward, 3, 224, 224)

        def call() -> None:
            with torch.no_grad():
                model(x)
    elif workload == "train":
        model.train()
        x = torch.randn(args.batch_train, 3, 224, 224)
        y = torch.randint(0, 1000, (args.batch_train,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def call() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        import chop

        model.eval()
        x = torch.randn(args.batch_train, 3, 224, 224)
        y = torch.randint(0, 1000, (args.batch_train,))

        def call() -> None:
            graph = chop.trace(copy.deepcopy(model), (x,))
            chop.run(graph, "snip, mask{granularity=channel, sparsity=0.5}, shrink",
                     data=[((x,), y)])
    call()
    seconds, faults = [], []
    for _ in range(args.calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"applied": applied, "seconds": statistics.median(seconds),
            "faults": statistics.median(faults), "resident_mib": resident_mib(),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(setting: str, workload: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CHOP_MALLOC"}
    command = [sys.executable, __file__, "--worker", setting, workload,
               "--calls", str(args.calls), "--batch-forward", str(args.batch_forward),
               "--batch-train", str(args.batch_train)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{setting} {workload} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--calls", type=at_least(1), default=3)
    parser.add_argument("--batch-forward", type=at_least(1), default=32)
    parser.add_argument("--batch-train", type=at_least(1), default=16)
    parser.add_argument("--worker", nargs=2, metavar=("SETTING", "WORKLOAD"), default=None,
                        help=argparse.SUPPRESS)  # internal: one measuring process
    args = parser.parse_args()
    if args.worker and (args.worker[0] not in SETTINGS or args.worker[1] not in WORKLOADS):
        parser.error(f"--worker {' '.join(args.worker)}: SETTING is one of {', '.join(SETTINGS)}, "
                     f"WORKLOAD one of {', '.join(WORKLOADS)}")
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_shrink import load

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds of one process per setting, {args.calls} calls each after one "
          f"to warm up; batch {args.batch_forward} (forward), {args.batch_train} (train, "
          f"structured); load average {load()}\n")
    print("| workload | default: s per call | reuse: s per call | default ÷ reuse "
          "| page faults per call (default / reuse) | peak MiB (default / reuse) "
          "| MiB kept after (default / reuse) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for workload in args.workloads:
        runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for r in range(args.rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                runs[setting].append(measure(setting, workload, args))
        if not all(run["applied"] for run in runs["reuse"]):
            print(f"| {workload} | reuse_freed_memory() did nothing here (not glibc, or the "
                  "environment chose the allocator) | | | | | |")
            continue
        med = {s: {k: statistics.median(run[k] for run in runs[s])
                   for k in ("seconds", "faults", "peak_mib", "resident_mib")} for s in SETTINGS}
        d, u = med["default"], med["reuse"]
        print(f"| {workload} | {d['seconds']:.2f} | {u['seconds']:.2f} "
              f"| {d['seconds'] / u['seconds']:.2f} | {d['faults']:,.0f} / {u['faults']:,.0f} "
              f"| {d['peak_mib']:,.0f} / {u['peak_mib']:,.0f} "
              f"| {d['resident_mib']:,.0f} / {u['resident_mib']:,.0f} |")
    print(f"\nload average: {load()}")


if __name__ == "__main__":
    main()
