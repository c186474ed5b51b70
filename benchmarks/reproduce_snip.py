"""Reproduce the published behaviour of SNIP on real data: scikit-learn's 8×8 digits.

What it does (issue 5, "A reproduction on real data"; DESIGN.md, "Published behaviour to
reproduce"):

- **Data.** scikit-learn's bundled ``load_digits`` (1797 samples, scaled to [0, 1], shaped
  ``(1, 8, 8)``), split once into 1297 train / 500 test samples, stratified, ``random_state=0``.
  The SNIP batch is a fixed set of 128 training samples (the same for every criterion and seed).
- **Models.** ``mlp``: LeNet-300-100 (:class:`chop.cli.models.LeNet300100`, 64 -> 300 -> 100 -> 10);
  ``lenet5``: the LeNet-5 of ``examples/models.py`` adapted to 8×8 inputs (3×3 convs with 6 and
  16 channels, then 64 -> 120 -> 84 -> 10). Weights He-initialised (kaiming normal, fan-in,
  ReLU gain), biases zero; the seed fixes the initialisation, the random criteria and the
  training order.
- **Criteria**, each a chop pipeline run on the freshly initialised graph (global scope over all
  linear and conv weights; biases are never pruned):

  ============== ============================================================================
  dense          no pruning
  snip           ``snip, mask{sparsity=s, scope=global}`` on the SNIP batch
  random         ``random{seed=seed}, mask{...}``
  magnitude      ``magnitude, mask{...}``
  synflow        ``synflow{sparsity=s}, mask{...}`` (data-free, 100 iterations)
  iterative-snip ``iterative-snip{sparsity=s, steps=5}`` (SNIP-it: 5 rounds, keep^(t/5))
  snip-shuffled  SNIP's mask with its entries permuted at random within each layer: the same
                 per-layer counts, random positions (does SNIP's choice *within* a layer
                 matter, or only its per-layer budget?)
  ============== ============================================================================

- **Training.** The masked graph (``mul(weight, mask)`` nodes) is trained with
  :func:`chop.training.loop.train_graph` — the loop of ``chop train`` — with Adam (lr 3e-3, batch 64)
  for ``--epochs`` epochs; the test accuracy after the last epoch is reported (no early stopping,
  nothing selected on the test set).
- **Outputs** (in ``--out``): ``reproduction.md`` (accuracy mean ± std over seeds per model and
  criterion, per-layer pruned fractions of LeNet-5 at 95%, the fraction of kept weights on an
  input→output path, the sparsity at which each criterion first empties a layer), ``reproduction.png`` (accuracy vs sparsity; needs matplotlib, the
  ``bench`` extra) and ``results.json`` (every run).

Run it from the repository root::

    python benchmarks/reproduce_snip.py --threads 1           # the full run: 5.7 min measured
    python benchmarks/reproduce_snip.py --seeds 1 --epochs 5 --models mlp --criteria snip,random \\
        --sparsities 0.98

The models are tiny: on a shared machine two torch threads stall on each other (measured 10-20x
slower per training step than one thread while other jobs ran), so ``--threads 1`` is the
fast choice there; the default is 2. ``--from-json out/results.json`` re-renders the report and
plot from a previous run without training.

The functions (:func:`run`, :func:`layer_fractions`, :func:`collapse_scan`, :func:`markdown`,
:func:`plot`) are importable; ``tests/benchmarks/test_reproduce_snip.py`` runs a small version.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import at_least, sparsity_arg, unique  # noqa: E402

import chop  # noqa: E402
from chop.cli.models import LeNet300100  # noqa: E402
from chop.ir import meta  # noqa: E402
from chop.ir.graph import Graph  # noqa: E402
from chop.ir.masks import MASK_OF, insert_mask  # noqa: E402
from chop.passes.analysis.collapse import collapse_summary, effective_masks  # noqa: E402
from chop.training.loop import TrainSpec, accuracy, train_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



@contextmanager
def quiet_chop() -> Iterator[None]:
    """Only errors from the ``chop`` logger while a block runs."""
    logger = logging.getLogger("chop")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

def _example_models() -> Any:
    """``examples/models.py`` (not a package), imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("chop_examples_models",
                                                  ROOT / "examples" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LeNet5 = _example_models().LeNet5

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: LeNet300100(in_features=64, num_classes=10),
    "lenet5": lambda: LeNet5(num_classes=10),
}
TITLES = {"mlp": "LeNet-300-100 (MLP)", "lenet5": "LeNet-5 (8×8 CNN)"}
CRITERIA = ("dense", "snip", "random", "magnitude", "synflow", "iterative-snip", "snip-shuffled")
SPARSITIES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998)
# The collapse scan: keep fractions 10^-1 .. 10^-4 on a log grid (sparsity 90% .. 99.99%).
COLLAPSE_GRID = tuple(round(1.0 - 10 ** (-1 - i / 20), 6) for i in range(61))
MIKLER_LENET5_95 = {"conv1": 0.29, "conv2": 0.72, "fc1": 0.975, "fc2": 0.92, "fc3": 0.70}

LR = 3e-3
BATCH_SIZE = 64
SNIP_BATCH = 128
TEST_SIZE = 500
ITERATIVE_STEPS = 5
SYNFLOW_ITERATIONS = 100

Split = tuple[torch.Tensor, torch.Tensor]


# -- data and models -----------------------------------------------------------------------------


@dataclass
class Data:
    """The fixed split and the fixed SNIP batch."""

    train: Split
    test: Split
    snip_batch: Split


def load_data(split_seed: int = 0) -> Data:
    """Digits, 1297 train / 500 test (stratified, ``split_seed``); SNIP batch: 128 train samples
    drawn with ``split_seed``."""
    from sklearn.model_selection import train_test_split

    from chop.cli.datasets import digits

    inputs, targets = digits()
    train_idx, test_idx = train_test_split(
        torch.arange(len(targets)).numpy(), test_size=TEST_SIZE, stratify=targets.numpy(),
        random_state=split_seed,
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    train = (inputs[train_idx], targets[train_idx])
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(split_seed))
    snip_batch = (train[0][pick[:SNIP_BATCH]], train[1][pick[:SNIP_BATCH]])
    return Data(train, (inputs[test_idx], targets[test_idx]), snip_batch)


def build(model: str, seed: int) -> nn.Module:
    """``model`` with He (kaiming normal, fan-in, ReLU) weights and zero biases, from ``seed``."""
    torch.manual_seed(seed)
    net = MODELS[model]()
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return net


# -- pruning -------------------------------------------------------------------------------------


def prune(graph: Graph, criterion: str, sparsity: float, data: Data, seed: int) -> None:
    """Mask ``graph`` in place with ``criterion`` at ``sparsity`` (global scope)."""
    batch = [data.snip_batch]
    mask = f"mask{{sparsity={sparsity}, scope=global}}"
    if criterion == "dense":
        return
    if criterion == "snip":
        chop.run(graph, f"snip, {mask}", data=batch)
    elif criterion == "random":
        chop.run(graph, f"random{{seed={seed}}}, {mask}")
    elif criterion == "magnitude":
        chop.run(graph, f"magnitude, {mask}")
    elif criterion == "synflow":
        chop.run(graph, f"synflow{{sparsity={sparsity}, iterations={SYNFLOW_ITERATIONS}}}, {mask}")
    elif criterion == "iterative-snip":
        chop.run(graph, f"iterative-snip{{sparsity={sparsity}, steps={ITERATIVE_STEPS}, "
                        "scope=global}", data=batch)
    elif criterion == "snip-shuffled":
        chop.run(graph, f"snip, {mask}", data=batch)
        shuffle_masks(graph, seed)
    else:
        raise ValueError(f"unknown criterion {criterion!r}; known: {', '.join(CRITERIA)}")


def shuffle_masks(graph: Graph, seed: int) -> None:
    """Permute every mask at random within its layer: the per-layer counts stay exact."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    for node in graph.weight_nodes():
        mask = meta.entries(node).get("mask")
        if mask is not None:
            flat = mask.flatten()
            insert_mask(graph, node, flat[torch.randperm(flat.numel(), generator=generator)]
                        .reshape(mask.shape))
    graph.recompile()


def layer_counts(graph: Graph) -> dict[str, tuple[int, int]]:
    """``{parameter: (kept, numel)}`` of every masked weight, read from the mask *buffers* the
    graph computes with (so after training this checks that the masks stayed applied)."""
    counts = {}
    for node in graph.module.graph.nodes:
        name = node.meta.get("chop", {}).get(MASK_OF)
        if name is not None:
            buffer = graph.module.get_buffer(node.args[1].target)
            counts[name] = (int(buffer.sum()), buffer.numel())
    return counts


# -- the experiment ------------------------------------------------------------------------------


@dataclass
class Run:
    """One trained network."""

    model: str
    criterion: str
    sparsity: float
    seed: int
    accuracy: float
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # kept, numel
    empty: list[str] = field(default_factory=list)
    seconds: float = 0.0


def train_and_test(graph: Graph, data: Data, epochs: int, seed: int) -> float:
    """Train with the ``chop train`` loop (Adam), return the test accuracy after the last epoch."""
    spec = TrainSpec(optimizer="adam", lr=LR, epochs=epochs, seed=seed)
    train_graph(graph, data.train, None, spec, BATCH_SIZE)
    return accuracy(graph, *data.test, 500)


def run(
    models: Sequence[str] = ("mlp", "lenet5"),
    criteria: Sequence[str] = CRITERIA,
    sparsities: Sequence[float] = SPARSITIES,
    seeds: Sequence[int] | int = 3,
    epochs: int = 60,
    *,
    data: Data | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> list[Run]:
    """Prune at initialisation and train every (model, criterion, sparsity, seed); ``dense`` is
    trained once per seed. Returns one :class:`Run` each."""
    data = data or load_data()
    seeds = range(seeds) if isinstance(seeds, int) else seeds
    runs = []
    for model in models:
        for seed in seeds:
            net = build(model, seed)
            base = chop.trace(net, (data.train[0][:2],))
            for criterion in criteria:
                for sparsity in ([0.0] if criterion == "dense" else sparsities):
                    start = time.perf_counter()
                    graph = base.copy()  # the same initial weights for every criterion
                    prune(graph, criterion, sparsity, data, seed)
                    acc = train_and_test(graph, data, epochs, seed)
                    layers = layer_counts(graph)
                    result = Run(model, criterion, sparsity, seed, acc, layers,
                                 [n for n, (k, _) in layers.items() if k == 0],
                                 time.perf_counter() - start)
                    runs.append(result)
                    if on_run is not None:
                        on_run(result)
    return runs


def layer_fractions(
    model: str, criteria: Sequence[str], sparsity: float, seeds: Sequence[int] | int,
    data: Data | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Pruned fraction of each layer after pruning at init (no training):
    ``{criterion: {layer: [fraction per seed]}}``."""
    data = data or load_data()
    seeds = range(seeds) if isinstance(seeds, int) else seeds
    out: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        base = chop.trace(build(model, seed), (data.train[0][:2],))
        for criterion in criteria:
            graph = base.copy()
            prune(graph, criterion, sparsity, data, seed)
            for name, (kept, numel) in layer_counts(graph).items():
                out.setdefault(criterion, {}).setdefault(name, []).append(1 - kept / numel)
    return out


def collapse_scan(
    models: Sequence[str], criteria: Sequence[str], seeds: Sequence[int] | int,
    grid: Sequence[float] = COLLAPSE_GRID, data: Data | None = None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """For each model, criterion and seed: the first sparsity of ``grid`` at which the mask
    empties a layer (and which), and the first at which some layer keeps no weight on an
    input→output path (the ``collapse`` analysis: empty *or* disconnected). Masks only, no
    training. ``{model: {criterion: [{"empty": s or None, "layers": [...],
    "disconnected": s or None, "disconnected_layers": [...]} per seed]}}``.

    The grid is searched by bisection, which assumes that a mask that collapses at sparsity s
    also collapses above s: exact for one-shot criteria (snip, magnitude, random: the kept sets
    are nested), an assumption for the iterative ones (synflow, iterative-snip)."""
    data = data or load_data()
    seeds = range(seeds) if isinstance(seeds, int) else seeds
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with quiet_chop():  # the mask pass warns on every emptied layer
        for model in models:
            for seed in seeds:
                base = chop.trace(build(model, seed), (data.train[0][:2],))
                for criterion in criteria:
                    if criterion == "dense":
                        continue
                    cache: dict[float, dict[str, Any]] = {}

                    def summary(sparsity: float) -> dict[str, Any]:
                        if sparsity not in cache:
                            graph = base.copy()
                            prune(graph, criterion, sparsity, data, seed)
                            effective_masks(graph)
                            cache[sparsity] = collapse_summary(graph)
                        return cache[sparsity]

                    empty = _first(grid, lambda s: bool(summary(s)["empty"]))
                    dead = _first(
                        grid, lambda s: bool(summary(s)["empty"] + summary(s)["disconnected"])
                    )
                    out.setdefault(model, {}).setdefault(criterion, []).append({
                        "empty": empty,
                        "layers": summary(empty)["empty"] if empty is not None else [],
                        "disconnected": dead,
                        "disconnected_layers": (summary(dead)["empty"] + summary(dead)["disconnected"]
                                                if dead is not None else []),
                    })
    return out


def _first(grid: Sequence[float], collapsed: Callable[[float], bool]) -> float | None:
    """The first point of ``grid`` where ``collapsed`` holds, by bisection (assumes that it
    then holds at every later point); None when it does not hold at the last point."""
    if not collapsed(grid[-1]):
        return None
    lo, hi = -1, len(grid) - 1  # collapsed(grid[hi]) holds; grid[lo] does not (or lo = -1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if collapsed(grid[mid]):
            hi = mid
        else:
            lo = mid
    return grid[hi]


def effective_fractions(
    models: Sequence[str], criteria: Sequence[str], sparsities: Sequence[float],
    seeds: Sequence[int] | int, data: Data | None = None,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """The fraction of kept weights that lie on an input→output path (the ``collapse``
    analysis), masks only: ``{model: {criterion: {str(sparsity): [fraction per seed]}}}``."""
    data = data or load_data()
    seeds = range(seeds) if isinstance(seeds, int) else seeds
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    with quiet_chop():  # the mask pass warns on every emptied layer
        for model in models:
            for seed in seeds:
                base = chop.trace(build(model, seed), (data.train[0][:2],))
                for criterion in criteria:
                    if criterion == "dense":
                        continue
                    for sparsity in sparsities:
                        graph = base.copy()
                        prune(graph, criterion, sparsity, data, seed)
                        effective_masks(graph)
                        fraction = collapse_summary(graph)["totals"]["effective_fraction"] or 0.0
                        out.setdefault(model, {}).setdefault(criterion, {}).setdefault(
                            str(sparsity), []).append(fraction)
    return out


# -- reporting -----------------------------------------------------------------------------------


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    """Mean ± std in %; the mean alone for one value (one seed has no spread)."""
    mean = f"{100 * statistics.fmean(values):.1f}"
    return f"{mean} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else mean


def _sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


def accuracy_table(runs: list[Run], model: str) -> str:
    """Markdown: test accuracy (%) mean ± std over seeds; rows criteria, columns sparsities.
    A † marks cells where some seed's mask emptied a layer."""
    mine = [r for r in runs if r.model == model]
    criteria = list(dict.fromkeys(r.criterion for r in mine))
    sparsities = sorted({r.sparsity for r in mine if r.criterion != "dense"})
    head = "| criterion | " + " | ".join(_sparsity_label(s) for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (len(sparsities) + 1)]
    for criterion in criteria:
        cells = []
        if criterion == "dense":
            dense = [r.accuracy for r in mine if r.criterion == "dense"]
            cells = [_mean_std(dense)] + [""] * (len(sparsities) - 1)
            lines.append("| dense (0%) | " + " | ".join(cells) + " |")
            continue
        for s in sparsities:
            found = [r for r in mine if r.criterion == criterion and r.sparsity == s]
            if not found:
                cells.append("")
                continue
            mark = " †" if any(r.empty for r in found) else ""
            cells.append(_mean_std([r.accuracy for r in found]) + mark)
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fractions_table(fractions: dict[str, dict[str, list[float]]], sizes: dict[str, int]) -> str:
    """Markdown: pruned fraction per layer (mean ± std over seeds) beside Mikler's LeNet-5."""
    criteria = list(fractions)
    lines = ["| layer | weights | Mikler (LeNet-5, MNIST) | "
             + " | ".join(criteria) + " |", "|" + "---|" * (len(criteria) + 3)]
    for name, numel in sizes.items():
        short = name.removesuffix(".weight")
        mikler = MIKLER_LENET5_95.get(short)
        cells = [_mean_std(fractions[c][name]) for c in criteria]
        lines.append(f"| {short} | {numel} | {_pct(mikler) if mikler is not None else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def collapse_table(scan: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Markdown: per model and criterion, the first sparsity that empties a layer (per seed)."""

    def show(values: list[float | None]) -> str:
        return " / ".join("none" if v is None else f"{100 * v:.2f}" for v in values)

    lines = ["| model | criterion | first empty layer at sparsity % (per seed) | layer emptied "
             "| first layer without an effective weight, % (per seed) |", "|---|---|---|---|---|"]
    for model, by_criterion in scan.items():
        for criterion, found in by_criterion.items():
            layers = sorted({n.removesuffix(".weight") for f in found for n in f["layers"]})
            lines.append(
                f"| {model} | {criterion} | {show([f['empty'] for f in found])} | "
                f"{', '.join(layers) or '—'} | {show([f['disconnected'] for f in found])} |"
            )
    return "\n".join(lines)


def effective_table(effective: dict[str, dict[str, dict[str, list[float]]]], model: str) -> str:
    """Markdown: effective fraction of the kept weights (%), mean ± std over seeds."""
    by_criterion = effective[model]
    sparsities = sorted({float(s) for found in by_criterion.values() for s in found})
    lines = ["| criterion | " + " | ".join(_sparsity_label(s) for s in sparsities) + " |",
             "|" + "---|" * (len(sparsities) + 1)]
    for criterion, found in by_criterion.items():
        cells = [_mean_std(found[str(s)]) if str(s) in found else "" for s in sparsities]
        lines.append(f"| {criterion} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(runs: list[Run], fractions: dict | None = None, sizes: dict | None = None,
             scan: dict | None = None, effective: dict | None = None, *,
             epochs: int | None = None, seconds: float | None = None) -> str:
    """The whole report as markdown."""
    parts = ["# SNIP reproduction on scikit-learn digits", ""]
    seeds = sorted({r.seed for r in runs})
    parts.append("Test accuracy (%, 500 test samples), "
                 + (f"mean ± std over {len(seeds)} seed(s)" if len(seeds) > 1 else "one seed")
                 + (f", {epochs} epochs of Adam" if epochs else "")
                 + (f"; run time {seconds / 60:.1f} min" if seconds and seconds >= 60 else
                    f"; run time {seconds:.0f} s" if seconds else "") + ". "
                 "† = some seed's mask emptied a whole layer.")
    for model in dict.fromkeys(r.model for r in runs):
        parts += ["", f"## {TITLES.get(model, model)}", "", accuracy_table(runs, model)]
    if fractions and sizes:
        parts += ["", "## LeNet-5 at 95%: pruned fraction per layer (%)", "",
                  fractions_table(fractions, sizes)]
    if effective:
        for model in effective:
            parts += ["", f"## {TITLES.get(model, model)}: kept weights on an input→output path "
                      "(%, masks only)", "", effective_table(effective, model)]
    if scan:
        parts += ["", "## Layer collapse (masks only, sparsity grid 90% … 99.99%)", "",
                  collapse_table(scan)]
    return "\n".join(parts) + "\n"


def plot(runs: list[Run], path: Path) -> bool:
    """Accuracy vs sparsity (x: 1 − sparsity, log scale), one panel per model; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r.model for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in runs if r.model == model]
        dense = [r.accuracy for r in mine if r.criterion == "dense"]
        if dense:
            ax.axhline(100 * statistics.fmean(dense), color="black", ls="--", lw=1, label="dense")
        ax.axhline(10, color="grey", ls=":", lw=1, label="chance (10 classes)")
        for criterion in dict.fromkeys(r.criterion for r in mine if r.criterion != "dense"):
            sparsities = sorted({r.sparsity for r in mine if r.criterion == criterion})
            accs = [[r.accuracy for r in mine if r.criterion == criterion and r.sparsity == s]
                    for s in sparsities]
            ax.errorbar([1 - s for s in sparsities], [100 * statistics.fmean(a) for a in accs],
                        yerr=[100 * statistics.stdev(a) if len(a) > 1 else 0 for a in accs],
                        marker="o", ms=3, lw=1.2, capsize=2, label=criterion)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ticks = sorted({1 - r.sparsity for r in mine if r.criterion != "dense"}, reverse=True)
        ax.set_xticks(ticks)
        ax.set_xticklabels([_sparsity_label(1 - t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("sparsity (log scale on 1 − sparsity)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(TITLES.get(model, model))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- the command ---------------------------------------------------------------------------------


def _sparsities(text: str) -> list[float]:
    """Comma-separated sparsities, each in [0, 1), without repeats; at least one."""
    values = unique([sparsity_arg(x) for x in text.split(",") if x.strip()])
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: no sparsity given")
    return values


def _unwritable(folder: Path) -> str | None:
    """Why the results could not be written into ``folder`` (None: they can), found without
    creating it (it is made once there is something to write): the nearest path on its way
    that exists must be a folder this user can write."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=at_least(1), default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=at_least(1), default=60,
                        help="training epochs (default 60)")
    parser.add_argument("--models", default="mlp,lenet5", help="mlp,lenet5")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help=",".join(CRITERIA))
    parser.add_argument("--sparsities", type=_sparsities, default=list(SPARSITIES),
                        help="comma-separated, e.g. 0.9,0.98")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out",
                        help="folder for reproduction.md, reproduction.png, results.json")
    parser.add_argument("--threads", type=at_least(1), default=2,
                        help="torch threads (default 2)")
    parser.add_argument("--no-collapse", action="store_true",
                        help="skip the masks-only analyses (collapse scan, effective fractions)")
    parser.add_argument("--from-json", type=Path, metavar="RESULTS",
                        help="re-render the report and plot from a results.json instead of "
                             "training (masks-only analyses it lacks are computed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = unique([m for m in args.models.split(",") if m])
    criteria = unique([c for c in args.criteria.split(",") if c])
    if not models:
        parser.error(f"--models {args.models!r}: no model given")
    if not criteria:
        parser.error(f"--criteria {args.criteria!r}: no criterion given")
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r}; known: {', '.join(MODELS)}")
    for c in criteria:
        if c not in CRITERIA:
            parser.error(f"unknown criterion {c!r}; known: {', '.join(CRITERIA)}")
    if args.from_json is not None and not args.from_json.is_file():
        parser.error(f"--from-json {args.from_json}: no such file")
    unwritable = _unwritable(args.out)
    if unwritable is not None:  # said now, not after the runs
        parser.error(f"--out {args.out}: {unwritable}; give a folder this user can write")
    try:
        import sklearn  # noqa: F401  (load_data: the digits and their split)
    except ImportError:
        raise SystemExit("scikit-learn absent: the digits data needs it "
                         "(pip install 'chop[bench]')") from None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    data = load_data()
    seeds = list(range(args.seeds))

    def progress(r: Run) -> None:
        empty = f"  empty: {', '.join(r.empty)}" if r.empty else ""
        print(f"[{time.perf_counter() - start:7.1f}s] {r.model:6s} {r.criterion:14s} "
              f"{_sparsity_label(r.sparsity):>6s} seed {r.seed}: {100 * r.accuracy:5.1f}%  "
              f"({r.seconds:.1f}s){empty}", flush=True)

    saved: dict[str, Any] = {}
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text(encoding="utf-8"))
        runs = [Run(**{**r, "layers": {k: tuple(v) for k, v in r["layers"].items()}})
                for r in saved["runs"]]
        models = list(dict.fromkeys(r.model for r in runs))
        criteria = list(dict.fromkeys(r.criterion for r in runs))
        seeds = sorted({r.seed for r in runs})
        args.sparsities = sorted({r.sparsity for r in runs if r.criterion != "dense"})
        args.epochs = saved.get("epochs", args.epochs)
    else:
        runs = run(models, criteria, args.sparsities, seeds, args.epochs, data=data,
                   on_run=progress)
    pruners = [c for c in criteria if c != "dense"]
    fractions = saved.get("layer_fractions_lenet5_95")
    sizes = None
    if "lenet5" in models:
        if fractions is None:
            fractions = layer_fractions("lenet5", [c for c in pruners if c != "snip-shuffled"],
                                        0.95, seeds, data)
        sizes = {name: p.numel() for name, p in build("lenet5", 0).named_parameters()
                 if name.endswith("weight")}
    scan, effective = saved.get("collapse"), saved.get("effective")
    if not args.no_collapse:
        if scan is None:
            scan = collapse_scan(models, [c for c in pruners if c != "snip-shuffled"], seeds,
                                 data=data)
        if effective is None:
            effective = effective_fractions(models, pruners, args.sparsities, seeds, data)
    seconds = saved.get("seconds", time.perf_counter() - start)
    text = markdown(runs, fractions, sizes, scan, effective, epochs=args.epochs, seconds=seconds)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    (args.out / "reproduction.md").write_text(text, encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps({
        "epochs": args.epochs, "seconds": seconds, "runs": [asdict(r) for r in runs],
        "layer_fractions_lenet5_95": fractions, "collapse": scan, "effective": effective,
    }, indent=1), encoding="utf-8")
    if plot(runs, args.out / "reproduction.png"):
        print(f"wrote {args.out / 'reproduction.md'} and {args.out / 'reproduction.png'}")
    else:
        print(f"wrote {args.out / 'reproduction.md'} (no plot: pip install matplotlib, or "
              "pip install chop[bench])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
