"""Benchmark the ``sparse`` export: chop's CSR layers vs dense vs torch's own CSR forms, on CPU.

Cases, at each element sparsity (``--sparsities``, default 0.90 0.95 0.99) and batch size
(``--batches``, default 1 32):

* ``linear``: one 4096×4096 linear layer with bias;
* ``mlp``: a 4096-4096-4096 MLP with tanh (two 4096×4096 linears), masked per layer by random
  saliency (``scope=local``) and exported by the chop pipeline ``sparse`` (``mode=auto``,
  ``kernel=measure``: each layer's kernel plan is measured when the pass runs);
* ``gated`` (not run by default): Llama's MLP block, ``down(silu(gate(x)) * up(x))`` with
  2048→5632→2048 weights and no biases, masked and exported as the MLP is; its torch forms keep
  every intermediate in the layout the form produces (``W@x.T``: transposed throughout).

Methods, timed interleaved (each repeat runs every method once, in turn; ``inner`` calls per
sample; median) under ``torch.no_grad()``:

* ``dense``: ``F.linear`` with the masked dense weight (for the MLP: the folded chop graph);
* ``chop``: ``torch.ops.chop.csr_linear`` with the layer's measured plan and ``transposed=True``
  (the result's layout is the one torch's ``W@x.T`` form returns); for the MLP: the graph the
  ``sparse`` pass produced, called as exported, pytree flattening and input guards included (its
  first layer's result is transposed, the output row-major);
* ``chop deploy``: the same without the per-call costs: the layer bound once by
  ``chop.kernels.csr.bind`` for the linear, ``deployable(graph, contiguous_outputs=False)`` for
  the MLP (the output left in the kernel's layout, as torch's ``W@x.T`` form leaves it);
* ``torch F.linear``: ``F.linear(x, W_csr, b)`` with ``W_csr = W.to_sparse_csr()`` (eager);
* ``torch W@x.T``: ``torch.addmm(b[:, None], W_csr, x.T).T`` (eager, the result left transposed);
* ``torch addmv``: ``torch.addmv(b, W_csr, row)`` for each input row, stacked (eager).

Every method's output is checked against dense before timing. Speedup is dense time ÷ method
time; "vs best torch" is the best torch form's time ÷ chop's (≥ 1: chop is at least as fast),
for the exported graph and for the deployed module. The chosen plans, the pass's time and the
fixed per-call costs (a custom-op call vs the plain function vs a bound layer on a 1×1 weight;
the op with a trainable bias, grad on and off, vs the same op with torch's generic autograd
kernel; an exported graph vs ``deployable`` on a tiny MLP) follow the table.

Targets (issue 13): chop ≥ the best torch CSR form everywhere; linear at batch 1: ≥ 8× at 95%,
≥ 30× at 99%; MLP: ≥ 8× at 95% at batch 1, ≥ 5× at 95% at batch 32.

Usage: ``python benchmarks/bench_sparse.py [--cases linear mlp gated] [--repeats R] [--threads N]
[--batches 1 32] [--stat median|min]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least, share, sparsity_arg, unique  # noqa: E402

import chop  # noqa: E402
from chop.kernels.csr import (  # noqa: E402
    bind,
    csr_linear,
    csr_linear_forward,
    describe_plan,
    plan_kernels,
    to_csr,
)
from chop.kernels.timing import interleaved_seconds  # noqa: E402
from chop.passes.export.common import deployable  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
METHODS = ("dense", "chop", "chop deploy", "torch F.linear", "torch W@x.T", "torch addmv")
TORCH_FORMS = METHODS[3:]
SIZE = 4096


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (SIZE, SIZE, SIZE)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.tanh(x) if i < len(self.layers) - 1 else x
        return x


class Gated(nn.Module):
    """Llama's MLP block: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, width: int = 2048, hidden: int = 5632):
        super().__init__()
        self.gate, self.up = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def torch_forms(weights: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """torch's three CSR forms over a chain of (dense weight, bias) layers with tanh between."""
    csr = [(w.to_sparse_csr(), b, b[:, None]) for w, b in weights]

    def linear() -> torch.Tensor:
        y = x
        for i, (w, b, _) in enumerate(csr):
            y = F.linear(y, w, b)
            y = torch.tanh(y) if i < len(csr) - 1 else y
        return y

    def mm() -> torch.Tensor:
        y = x
        for i, (w, _, column) in enumerate(csr):
            y = torch.addmm(column, w, y.t()).t()
            y = torch.tanh(y) if i < len(csr) - 1 else y
        return y

    def mv() -> torch.Tensor:
        y = x
        for i, (w, b, _) in enumerate(csr):
            y = torch.stack([torch.addmv(b, w, row) for row in y])
            y = torch.tanh(y) if i < len(csr) - 1 else y
        return y

    return {"torch F.linear": linear, "torch W@x.T": mm, "torch addmv": mv}


def linear_case(sparsity: float, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """Methods for one masked 4096×4096 linear layer, plus what the run chose."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(SIZE, SIZE, generator=g) * 0.02, torch.randn(SIZE, generator=g)
    mask = torch.rand(SIZE, SIZE, generator=g) >= sparsity
    dense = weight * mask
    csr = to_csr(weight, mask)
    start = time.perf_counter()
    kernels, from_rows, timings = plan_kernels(*csr, (SIZE, SIZE))
    seconds = time.perf_counter() - start
    x = torch.randn(batch, SIZE, generator=g)
    layer = bind(*csr, (SIZE, SIZE), bias, kernels, from_rows, True)
    fns = {
        "dense": lambda: F.linear(x, dense, bias),
        "chop": lambda: csr_linear(x, *csr, SIZE, bias, kernels, from_rows, True, SIZE),
        "chop deploy": lambda: layer(x),
        **torch_forms([(dense, bias)], x),
    }
    return fns, {"plan": describe_plan(kernels, from_rows), "planning s": round(seconds, 2),
                 "µs at 1 row": {k: round(v * 1e6) for k, v in timings[1].items()}}


def exported(model: nn.Module, x: torch.Tensor, sparsity: float) -> tuple[Any, Any, dict]:
    """``model`` masked by random saliency per layer, as a dense graph with its masks folded
    (the baseline) and as the graph the ``sparse`` pass made, both in eval mode, and what the
    pass chose (each layer's plan) and how long it took."""
    sparse_graph = chop.run(chop.trace(model, (x[:2],)),
                            f"random, mask{{sparsity={sparsity}, scope=local}}")
    dense_graph = chop.run(sparse_graph.copy(), "fold")
    start = time.perf_counter()
    chop.run(sparse_graph, "sparse")
    seconds = time.perf_counter() - start
    layers = sparse_graph.history[-1].info["layers"]
    plans = {k.removesuffix(".weight"): r.get("kernels", {}).get("plan", r["decision"])
             for k, r in layers.items()}
    return dense_graph.eval(), sparse_graph.eval(), {"plans": plans,
                                                      "sparse pass s": round(seconds, 1)}


def mlp_case(sparsity: float, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """Methods for the whole MLP: the folded graph, the chop sparse graph, torch CSR eager."""
    torch.manual_seed(seed)
    model = MLP().eval()
    x = torch.randn(batch, SIZE)
    dense_graph, sparse_graph, extra = exported(model, x, sparsity)
    deploy = deployable(sparse_graph, contiguous_outputs=False)
    weights = [(dense_graph.parameter(f"layers.{i}.weight").detach(),
                dense_graph.parameter(f"layers.{i}.bias").detach()) for i in range(2)]
    fns = {"dense": lambda: dense_graph(x), "chop": lambda: sparse_graph(x),
           "chop deploy": lambda: deploy(x), **torch_forms(weights, x)}
    return fns, extra


def gated_forms(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """torch's three CSR forms of the gated block, from its (masked) dense weights."""
    g, u, d = (w.to_sparse_csr() for w in (gate, up, down))

    def linear() -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

    def mm() -> torch.Tensor:  # every intermediate stays (features, rows): no transposing copy
        right = x.t()
        return torch.mm(d, F.silu(torch.mm(g, right)) * torch.mm(u, right)).t()

    def mv() -> torch.Tensor:
        return torch.stack([torch.mv(d, F.silu(torch.mv(g, row)) * torch.mv(u, row)) for row in x])

    return {"torch F.linear": linear, "torch W@x.T": mm, "torch addmv": mv}


def gated_case(sparsity: float, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """Methods for the gated block: as :func:`mlp_case`."""
    torch.manual_seed(seed)
    model = Gated().eval()
    x = torch.randn(batch, model.gate.in_features)
    dense_graph, sparse_graph, extra = exported(model, x, sparsity)
    deploy = deployable(sparse_graph, contiguous_outputs=False)
    weights = [dense_graph.parameter(f"{k}.weight").detach() for k in ("gate", "up", "down")]
    fns = {"dense": lambda: dense_graph(x), "chop": lambda: sparse_graph(x),
           "chop deploy": lambda: deploy(x), **gated_forms(*weights, x)}
    return fns, extra


CASES = {"linear": linear_case, "mlp": mlp_case, "gated": gated_case}


def generic_autograd_op() -> Callable[..., torch.Tensor]:
    """``chop::csr_linear``'s schema and CPU kernel as a second op whose autograd is
    ``torch.library.register_autograd``'s generic kernel (saving what chop's saves): the
    baseline of chop's own Autograd kernel in :func:`per_call_costs`."""
    if not hasattr(torch.ops.bench_sparse, "csr_linear"):
        lib = torch.library.Library("bench_sparse", "FRAGMENT")
        lib.define(str(torch.ops.chop.csr_linear.default._schema).split("::", 1)[1])
        lib.impl("csr_linear", csr_linear_forward, "CPU")
        GENERIC_LIBS.append(lib)

        def setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
            ctx.save_for_backward(*inputs[1:4])

        def backward(ctx: Any, grad: torch.Tensor) -> tuple:
            raise NotImplementedError("timed forward only")

        torch.library.register_autograd("bench_sparse::csr_linear", backward, setup_context=setup)
    return torch.ops.bench_sparse.csr_linear.default


GENERIC_LIBS: list[Any] = []  # keeps the baseline op's library (and kernels) alive


def per_call_costs() -> dict[str, float]:
    """Fixed costs in µs per call: the custom op vs its plain function vs the layer bound by
    ``bind`` on a 1×1 weight; the op with a trainable bias (as the export keeps it), with grad
    on and under ``no_grad``, against the same op with torch's generic autograd kernel; an
    exported 2-layer graph vs deployable() on a 4×4 MLP at batch 1, and the copy that turns
    ``W_csr @ x.T`` (4096 × 32) into the contiguous ``(32, 4096)`` result chop returns (torch's
    ``W@x.T`` form leaves its result transposed)."""
    csr = to_csr(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool))
    x = torch.ones(1, 1)
    bias = nn.Parameter(torch.zeros(1))
    generic = generic_autograd_op()
    small = MLP((4, 4, 4)).eval()
    graph = chop.run(chop.trace(small, (torch.randn(2, 4),)), "random, mask{sparsity=0.5}, "
                     "sparse{mode=all, kernel=torch-mm}").eval()
    deploy = deployable(graph)
    x4 = torch.randn(1, 4)
    layer = bind(*csr, (1, 1), None, [1], [])
    transposed = torch.randn(SIZE, 32)

    def with_bias(op: Callable[..., torch.Tensor], grad: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:  # interleaved_seconds times under no_grad
            with torch.set_grad_enabled(grad):
                return op(x, *csr, 1, bias, [1], [], False, 1)
        return call

    t = interleaved_seconds({
        "custom op": lambda: csr_linear(x, *csr, 1, None, [1], [], False, 1),
        "plain function": lambda: csr_linear_forward(x, *csr, 1, None, [1], [], False, 1),
        "bound layer": lambda: layer(x),
        "custom op, trainable bias, grad on": with_bias(csr_linear, True),
        "the same, generic autograd kernel": with_bias(generic, True),
        "custom op, trainable bias, no_grad": with_bias(csr_linear, False),
        "the same, generic autograd kernel, no_grad": with_bias(generic, False),
        "exported graph": lambda: graph(x4),
        "deployable": lambda: deploy(x4),
        "eager MLP (dense)": lambda: small(x4),
        "transposing a 4096x32 result": lambda: transposed.t().contiguous(),
    }, repeats=200, warmup=20, inner=10)
    return {k: v * 1e6 for k, v in t.items()}


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=sparsity_arg, nargs="+", default=[0.90, 0.95, 0.99])
    parser.add_argument("--batches", type=at_least(1), nargs="+", default=[1, 32])
    parser.add_argument("--cases", nargs="+", default=["linear", "mlp"], choices=list(CASES))
    parser.add_argument("--repeats", type=at_least(1), default=15)
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch intra-op threads")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic over the repeats (min: least disturbed by other load)")
    args = parser.parse_args()
    args.cases, args.batches = unique(args.cases), unique(args.batches)  # one row each
    args.sparsities = unique(args.sparsities)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, {args.stat} of {args.repeats} interleaved repeats, "
          f"load average {load()}\n")
    print("| case | batch | sparsity | dense ms | " + " | ".join(f"{m} ×" for m in METHODS[1:])
          + " | chop vs best torch | deploy vs best torch |")
    print("|---|---:|---:|---:|" + "---:|" * (len(METHODS) + 1))
    notes = []
    for case in args.cases:
        for batch in args.batches:
            for sparsity in args.sparsities:
                fns, extra = CASES[case](sparsity, batch)
                with torch.no_grad():
                    reference = fns["dense"]()
                    for name in METHODS[1:]:
                        torch.testing.assert_close(fns[name](), reference, rtol=1e-4, atol=1e-4)
                inner = 10 if batch == 1 else 2
                t = interleaved_seconds(fns, repeats=args.repeats, warmup=2, inner=inner,
                                        statistic=args.stat)
                best_torch = min(t[m] for m in TORCH_FORMS)
                cells = [f"{t['dense'] / t[m]:.1f}×" for m in METHODS[1:]]
                print(f"| {case} | {batch} | {share(sparsity)} | {t['dense'] * 1e3:.3f} | "
                      + " | ".join(cells) + f" | {best_torch / t['chop']:.2f} | "
                      f"{best_torch / t['chop deploy']:.2f} |", flush=True)
                notes.append(f"{case} b={batch} s={sparsity}: {extra}")
    print(f"\nload average at the end: {load()}")
    costs = per_call_costs()
    print("fixed costs, µs per call: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
