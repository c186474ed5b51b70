"""Per-rank memory and time of SNIP pruning on 1 process, 2 data-parallel ranks and 2 FSDP2 ranks.

The model is a stack of ``depth`` square linear layers of ``width`` (ReLU between them) and a
small head: with the defaults 24 x 4096² ≈ 403M parameters, 1.6 GB in float32. Each
configuration runs in fresh processes (gloo on CPU) and prunes the model once to ``sparsity``
with ``chop.Pruner`` and ``snip``, global scope:

- **1 rank**: one process, the whole model, every batch; the Pruner traces it (torch.export) and
  scores the graph.
- **2 ranks, data parallel**: each rank holds the whole model and scores its own batch; the
  scores are all-reduced (``snip``'s ``distributed=auto``), so both ranks make the same masks.
- **2 ranks, FSDP2**: the model is built on the meta device, sharded with ``fully_shard`` (each
  linear and the root) and only then given memory, so no rank ever holds all the weights; the
  Pruner scores the local shards eagerly and selects over the shards with all-reduced radix
  histograms.

What is measured, per rank:

- **peak RSS**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the high-water mark of the
  process's resident memory (everything: torch, gloo, the model, scores, masks). ``base`` is the
  same figure just before the model is built (torch imported, process group up), and
  ``peak - base`` what building and pruning the model added.
- **time**: wall time of building the model (``build``), of tracing it (``trace``: the graph
  path; a sharded model is not traced), of scoring (``score``) and of selecting and applying
  the masks (``select``).
- **chop's collectives**: calls, bytes and wall time of the ``all_reduce``/``broadcast`` calls
  chop makes (the summed scores of data parallelism, the histograms and counts of sharded
  selection), timed by wrapping ``torch.distributed``. FSDP2's own all-gathers and
  reduce-scatters are asynchronous and are not timed; their volume is printed from the model
  size instead.

Run it from the repository root (about 2 minutes and 10 GB of RAM with the defaults)::

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --width 2048 --depth 8     # a quick look

On this machine (2 CPU cores) the 2-rank runs get one core each and the 1-rank run both, so
time cannot scale; the table shows memory per rank and the cost of the collectives.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import queue
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least, percent, sparsity_arg  # noqa: E402

import chop  # noqa: E402
from chop.kernels.distributed import local  # noqa: E402
from chop.training.pruner import Pruner  # noqa: E402

GiB = 1 << 30


def build(width: int, depth: int, classes: int) -> nn.Sequential:
    """The model on the meta device (no memory yet)."""
    with torch.device("meta"):
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(width, classes))


def materialize(model: nn.Module, seed: int) -> None:
    """Give the (local shards of the) parameters memory and random values."""
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            local(p).normal_(0.0, 0.02, generator=g)


def batch(width: int, classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(size, width, generator=g), torch.randint(0, classes, (size,), generator=g)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


def time_collectives() -> dict[str, float]:
    """Wrap torch.distributed.all_reduce/broadcast (what chop calls) to count and time them."""
    stats = {"calls": 0, "bytes": 0, "seconds": 0.0}
    for name in ("all_reduce", "broadcast"):
        real = getattr(dist, name)

        def timed(tensor, *args, _real=real, **kwargs):
            start = time.perf_counter()
            out = _real(tensor, *args, **kwargs)
            stats["seconds"] += time.perf_counter() - start
            stats["calls"] += 1
            stats["bytes"] += tensor.numel() * tensor.element_size()
            return out

        setattr(dist, name, timed)
    return stats


def run_rank(rank: int, world: int, mode: str, args: argparse.Namespace, store: str,
             results) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))
    from torch.distributed.fsdp import fully_shard  # imported before anything is measured

    stats = time_collectives()
    base = peak_gib()
    start = time.perf_counter()
    model = build(args.width, args.depth, args.classes)
    if mode == "fsdp":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    materialize(model, seed=rank if mode == "fsdp" else 0)
    built = time.perf_counter() - start
    mine = [batch(args.width, args.classes, args.batch, b) for b in range(args.batches)
            if b % world == rank]
    start = time.perf_counter()
    if mode != "fsdp":  # the graph the Pruner traces a plain module into, timed on its own
        model = chop.trace(model, (mine[0][0],))
    traced = time.perf_counter() - start
    criterion = f"snip{{batches={len(mine)}}}"
    pruner = Pruner(model, args.sparsity, criterion=criterion, data=mine)
    start = time.perf_counter()
    pruner.score()
    scored = time.perf_counter() - start
    start = time.perf_counter()
    pruner.prune(args.sparsity, score=False)
    selected = time.perf_counter() - start
    results.put({
        "mode": mode, "rank": rank, "base": base, "peak": peak_gib(), "build": built,
        "trace": traced,
        "score": scored, "select": selected, "kept": pruner.history[-1]["kept"],
        "numel": pruner.history[-1]["numel"], **stats,
    })
    if world > 1:
        dist.destroy_process_group()


def launch(mode: str, world: int, args: argparse.Namespace) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        procs = [context.Process(target=run_rank, args=(r, world, mode, args, store, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        out: list[dict] = []
        try:  # short waits, so that a rank that dies stops the run at once (not after 30 min)
            deadline = time.monotonic() + 1800
            while len(out) < world:
                try:
                    out.append(results.get(timeout=0.2))
                    deadline = time.monotonic() + 1800
                    continue
                except queue.Empty:
                    pass
                done = {x["rank"] for x in out}  # a rank that reported may fail after it
                dead = [f"rank {r} exited with code {p.exitcode}"
                        + (f" (signal {-p.exitcode})" if p.exitcode < 0 else "")
                        for r, p in enumerate(procs)
                        if r not in done and p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    why = ", ".join(dead) or "no result in 30 minutes"
                    raise SystemExit(f"{mode} run ({world} ranks) stopped: {why}")
        finally:
            for p in procs:
                if p.is_alive() and len(out) < world:
                    p.terminate()
                p.join()
    return sorted(out, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=at_least(1), default=4096)
    parser.add_argument("--depth", type=at_least(1), default=24)
    parser.add_argument("--classes", type=at_least(2), default=16)
    parser.add_argument("--batch", type=at_least(1), default=8, help="samples per batch")
    parser.add_argument("--batches", type=int, default=2,
                        help="batches in all, an even number (split over the 2 ranks)")
    parser.add_argument("--sparsity", type=sparsity_arg, default=0.9)
    args = parser.parse_args()
    if args.batches < 2 or args.batches % 2:
        parser.error(f"--batches {args.batches}: an even number (at least 2), since the 2-rank "
                     "runs split the batches over the ranks and each rank needs as many to score "
                     "(FSDP2's ranks wait for each other at every forward and backward)")
    params = args.depth * (args.width * args.width + args.width) + args.classes * (args.width + 1)
    count = f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params:,}"
    print(f"model: {args.depth} x Linear({args.width}, {args.width}) + head, "
          f"{count} parameters ({params * 4 / GiB:.2f} GiB float32); "
          f"snip on {args.batches} batches of {args.batch}, mask at {percent(args.sparsity)} "
          f"global; {os.cpu_count()} CPU cores")
    runs = {"one": launch("one", 1, args), "dp": launch("dp", 2, args),
            "fsdp": launch("fsdp", 2, args)}
    names = {"one": "1 rank, whole model", "dp": "2 ranks, data parallel",
             "fsdp": "2 ranks, FSDP2 sharded"}
    header = (f"{'configuration':<24} {'peak RSS':>9} {'base':>6} {'peak-base':>9} "
              f"{'build':>6} {'trace':>6} {'score':>6} {'select':>7} {'chop collectives':>26} "
              f"{'kept':>11}")
    print("\nper rank (the larger of the ranks; GiB, seconds)\n" + header)
    print("-" * len(header))
    worst = {}
    for mode, ranks in runs.items():
        r = {k: max(x[k] for x in ranks) for k in ("base", "peak", "build", "trace", "score",
                                                    "select", "calls", "bytes", "seconds")}
        worst[mode] = r
        collectives = (f"{int(r['calls'])} calls {r['bytes'] / GiB:5.2f} GiB {r['seconds']:5.2f} s"
                       if mode != "one" else "-")
        print(f"{names[mode]:<24} {r['peak']:9.2f} {r['base']:6.2f} {r['peak'] - r['base']:9.2f} "
              f"{r['build']:6.1f} {r['trace']:6.1f} {r['score']:6.1f} {r['select']:7.1f} "
              f"{collectives:>26} "
              f"{ranks[0]['kept']:>11}")
        assert len({x["kept"] for x in ranks}) == 1 and ranks[0]["numel"] > 0
    one = worst["one"]
    print("\nratios to 1 rank (per rank)")
    for mode in ("dp", "fsdp"):
        r = worst[mode]
        print(f"{names[mode]:<24} peak RSS {r['peak'] / one['peak']:.2f}x, "
              f"peak-base {(r['peak'] - r['base']) / (one['peak'] - one['base']):.2f}x, "
              f"score {r['score'] / one['score']:.2f}x, select {r['select'] / one['select']:.2f}x")
    fsdp_gib = 3 * 0.5 * params * 4 / GiB
    print(f"\nFSDP2's own traffic per rank and batch (not timed): all-gather forward and backward "
          f"plus reduce-scatter of the gradients, 3 x (1 - 1/2) x {params * 4 / GiB:.2f} GiB "
          f"= {fsdp_gib:.2f} GiB")


if __name__ == "__main__":
    main()
