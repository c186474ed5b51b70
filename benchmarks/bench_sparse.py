"""Benchmark the ``sparse`` export: chop's CSR kernel vs dense vs torch's CPU CSR, on CPU.

Cases, at each element sparsity (``--sparsities``, default 0.90 0.95 0.99) and batch size
(``--batches``, default 1 64):

* ``linear``: one 4096×4096 linear layer (with bias);
* ``mlp``: a 784-4096-4096-10 MLP with ReLU, masked per layer (``scope=local``) by random
  saliency and exported by the chop pipeline ``sparse`` with its default ``mode=auto`` (the
  4096×10 head stays dense: below ``min_numel``).

Methods, timed interleaved (each repeat runs every method once, in turn; ``--inner`` calls per
sample) and reported as medians under ``torch.no_grad()``:

* ``dense``: ``F.linear`` with the masked dense weight (the folded graph, for the MLP);
* ``chop csr``: ``torch.ops.chop.csr_linear`` (scipy's compiled CSR loops), via the graph that
  the ``sparse`` pass produced for the MLP;
* ``torch csr``: ``F.linear`` with ``weight.to_sparse_csr()``.

Every method's output is checked against dense (fp32 allclose) before timing. A markdown table
with speedups vs dense is printed; ``--threads N`` sets torch's intra-op threads (scipy's kernel
is single-threaded either way). One-off costs (CSR conversion, the pass itself) and the custom
op's per-call overhead are printed below the table.

Usage: ``python benchmarks/bench_sparse.py [--repeats R] [--threads N] [--batches 1 64]
[--stat median|min]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chop  # noqa: E402
from chop.kernels.csr import csr_linear, to_csr  # noqa: E402
from chop.kernels.timing import median_seconds  # noqa: E402
from chop.ir.masks import insert_mask  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
METHODS = ("dense", "chop csr", "torch csr")


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (784, 4096, 4096, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu(x) if i < len(self.layers) - 1 else x
        return x


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, inner: int, stat: str = "median"
) -> dict[str, float]:
    """Median (or min) seconds per call of each function, sampled in turn ``repeats`` times."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - start) / inner)
    reduce = statistics.median if stat == "median" else min
    return {k: reduce(v) for k, v in samples.items()}


def linear_case(sparsity: float, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """Methods for one masked 4096×4096 linear layer, plus one-off costs."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(4096, 4096, generator=g) * 0.02, torch.randn(4096, generator=g)
    mask = torch.rand(4096, 4096, generator=g) >= sparsity
    dense = weight * mask
    start = time.perf_counter()
    csr = to_csr(weight, mask)
    convert = time.perf_counter() - start
    torch_csr = dense.to_sparse_csr()
    x = torch.randn(batch, 4096, generator=g)
    fns = {
        "dense": lambda: F.linear(x, dense, bias),
        "chop csr": lambda: csr_linear(x, *csr, 4096, bias),
        "torch csr": lambda: F.linear(x, torch_csr, bias),
    }
    return fns, {"to_csr (s)": convert}


def mlp_case(sparsity: float, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """Methods for the whole MLP: the folded graph, the chop sparse graph, torch CSR eager."""
    torch.manual_seed(seed)
    model = MLP().eval()
    x = torch.randn(batch, 784)
    pipeline = f"random, mask{{sparsity={sparsity}, scope=local}}"
    sparse_graph = chop.run(chop.trace(model, (x[:2],)), pipeline)
    dense_graph = chop.trace(model, (x[:2],))
    masks = {n.target: n.meta["chop"]["mask"] for n in sparse_graph.weight_nodes()
             if "mask" in n.meta["chop"]}
    for node in dense_graph.weight_nodes():  # the same masks, folded: the dense baseline
        if node.target in masks:
            insert_mask(dense_graph, node, masks[node.target])
    chop.run(dense_graph, "fold")
    start = time.perf_counter()
    chop.run(sparse_graph, "sparse")
    seconds = time.perf_counter() - start
    dense_graph.eval()
    sparse_graph.eval()
    csr_weights = [(dense_graph.parameter(f"layers.{i}.weight").detach().to_sparse_csr(),
                    dense_graph.parameter(f"layers.{i}.bias").detach()) for i in range(3)]

    def torch_csr() -> torch.Tensor:
        y = x
        for i, (w, b) in enumerate(csr_weights):
            y = F.linear(y, w, b)
            y = torch.relu(y) if i < 2 else y
        return y

    decisions = {k.split(".")[1]: v["decision"]
                 for k, v in sparse_graph.history[-1].info["layers"].items()}
    fns = {"dense": lambda: dense_graph(x), "chop csr": lambda: sparse_graph(x), "torch csr": torch_csr}
    return fns, {"sparse pass (s)": seconds, "layers": decisions}


def op_overhead() -> tuple[float, float]:
    """(custom op on a 1×1 weight, scipy csr_matvec called directly) in µs per call."""
    from scipy.sparse import _sparsetools
    import numpy as np

    csr = to_csr(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    x = torch.ones(1, 1)
    arrays = [t.numpy() for t in (csr[2], csr[1], csr[0])]
    op = median_seconds(lambda: csr_linear(x, *csr, 1, None), 500) * 1e6
    raw = median_seconds(
        lambda: _sparsetools.csr_matvec(1, 1, *arrays, x[0].numpy(), np.zeros(1, np.float32)), 500
    ) * 1e6
    return op, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.90, 0.95, 0.99])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--cases", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic over the repeats (min: least disturbed by other load)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}, {args.stat} of {args.repeats} "
          "interleaved repeats\n")
    print("| case | batch | sparsity | dense ms | chop csr ms | speedup | torch csr ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for case in args.cases:
        for batch in args.batches:
            for sparsity in args.sparsities:
                fns, extra = (linear_case if case == "linear" else mlp_case)(sparsity, batch)
                reference = fns["dense"]()
                for name in METHODS[1:]:
                    torch.testing.assert_close(fns[name](), reference, rtol=1e-4, atol=1e-4)
                inner = 20 if batch == 1 else 2
                t = interleaved(fns, args.repeats, inner, args.stat)
                d, c, s = (t[m] * 1e3 for m in METHODS)
                print(f"| {case} | {batch} | {sparsity:.2f} | {d:.3f} | {c:.3f} | {d / c:.1f}× "
                      f"| {s:.3f} | {d / s:.2f}× |", flush=True)
                notes.append(f"{case} b={batch} s={sparsity}: {extra}")
    op, raw = op_overhead()
    print(f"\ncustom-op call on a 1×1 weight: {op:.1f} µs; scipy csr_matvec alone: {raw:.1f} µs")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
