"""``collapse``: empty layers and effective sparsity (the kept weights on an input→output path).

At high sparsity a mask can empty a whole layer (layer collapse, Tanaka et al. 2020) or leave
kept weights that no input reaches or that reach no output: they cost memory but compute
nothing. For each masked weight this pass counts the kept weights, the *effective* ones, and
flags empty layers (nothing kept) and disconnected ones (something kept, nothing effective).

**Method (exact for its class of networks).** The graph is run once forward and once backward
in float64, in eval mode, with every weight replaced by its connectivity: a masked weight by its
mask (0/1), any other linear/conv/embedding weight by its non-zero pattern, normalisation scales
by 1, biases (and other additive parameters, role ``bias``) by 0, BatchNorm statistics by
mean 0 / variance 1, max-pooling by average pooling over the same windows (max-pooling routes
the gradient to one element of a window, but every element of the window is connected), and
every floating-point input by ones (on the batch's first two samples: all-ones samples are all
the same one; a model with integer inputs runs the whole batch, whose tokens pick the rows
reached). Then every activation is ≥ 0 and is > 0 exactly when the
unit is reachable from the input, and the gradient of R = Σ outputs with respect to a kept weight
w (from unit j to unit i) is the product of the number of paths input → j and i → output (summed
over positions for a convolution). So a kept weight is effective iff ∂R/∂w > 0 — SynFlow's
all-ones product with |θ| replaced by the mask.

**Limits.** Exact for networks of linear/conv layers, ReLU-like or positive-preserving
activations (ReLU, GELU, sigmoid, tanh on positive inputs), average/max pooling (without
dilation), flatten/reshape, residual additions and concatenation, and BatchNorm. Ops that
subtract or normalise by a mean (LayerNorm, softmax attention, GroupNorm on constant inputs)
or multiply activations together can zero or mix the signal, and integer inputs (token ids) are
fed as given, not as ones: the result is then an approximation, not a reachability count. Path
counts grow exponentially with depth; if they overflow float64 the pass raises
:class:`CollapseError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.fx import Node

from chop.errors import CollapseError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.pipeline.batches import call, cut_batch, take
from chop.pipeline.pass_base import Context, Pass, PassResult

log = logging.getLogger("chop")
aten = torch.ops.aten
EFFECTIVE = "effective"  # meta["chop"] key: bool tensor, True = kept and on an input→output path

_MAX_POOL_TO_AVG = {
    aten.max_pool1d.default: aten.avg_pool1d.default,
    aten.max_pool2d.default: aten.avg_pool2d.default,
    aten.max_pool3d.default: aten.avg_pool3d.default,
}



def _swap(owner: nn.Module, store: str, attr: str, value: Any, saved: list) -> None:
    table = getattr(owner, store)
    saved.append((table, attr, table[attr]))
    table[attr] = value


@contextmanager
def _connectivity_weights(graph: Graph, masked: list[Node]) -> Iterator[list[nn.Parameter]]:
    """Swap every parameter and float buffer for its float64 connectivity value (see the module
    doc); yields the new parameters of ``masked``; puts the originals back on exit."""
    module = graph.module
    saved: list = []
    stats = {}  # buffer name -> value: BatchNorm running mean 0, running var 1
    for node in module.graph.nodes:
        if getattr(node.target, "overloadpacket", None) is aten.batch_norm:
            for index, fill in ((3, 0.0), (4, 1.0)):
                arg = node.args[index] if len(node.args) > index else None
                if isinstance(arg, Node) and arg.op == "get_attr":
                    stats[arg.target] = fill
    try:
        for node in graph.weight_nodes():
            entry = meta.entries(node)
            weight = graph.parameter(node).detach()
            if not weight.is_floating_point():
                continue
            role = entry.get("role")
            if "mask" in entry:
                value = entry["mask"].to(weight.device, torch.float64)
            elif role == "bias":
                value = torch.zeros_like(weight, dtype=torch.float64)
            elif role == "norm":
                value = torch.ones_like(weight, dtype=torch.float64)
            else:
                value = (weight != 0).to(torch.float64)
            owner, _, attr = node.target.rpartition(".")
            _swap(module.get_submodule(owner), "_parameters", attr,
                  nn.Parameter(value, requires_grad="mask" in entry), saved)
        for name, buffer in list(module.named_buffers()):
            if not buffer.is_floating_point():
                continue
            value = (torch.full_like(buffer, stats[name], dtype=torch.float64) if name in stats
                     else buffer.to(torch.float64))
            owner, _, attr = name.rpartition(".")
            _swap(module.get_submodule(owner), "_buffers", attr, value, saved)
        yield [graph.parameter(n) for n in masked]
    finally:
        for table, attr, value in reversed(saved):
            table[attr] = value


@contextmanager
def _pooling_as_average(graph: Graph) -> Iterator[None]:
    """Max-pooling nodes (without dilation) computed as average pooling; restored on exit."""
    changed = []
    for node in graph.module.graph.nodes:
        avg = _MAX_POOL_TO_AVG.get(node.target)
        if avg is None:
            continue
        x, kernel, *rest = node.args
        stride = rest[0] if len(rest) > 0 else node.kwargs.get("stride", [])
        padding = rest[1] if len(rest) > 1 else node.kwargs.get("padding", 0)
        dilation = rest[2] if len(rest) > 2 else node.kwargs.get("dilation", 1)
        ceil_mode = rest[3] if len(rest) > 3 else node.kwargs.get("ceil_mode", False)
        if any(d != 1 for d in (dilation if isinstance(dilation, (list, tuple)) else [dilation])):
            log.warning("collapse: %s has dilation %s; its windows are approximated", node.name,
                        dilation)
            continue
        changed.append((node, node.target, node.args, node.kwargs))
        node.target, node.args, node.kwargs = avg, (x, kernel, stride, padding, ceil_mode), {}
    graph.recompile()
    try:
        yield
    finally:
        for node, target, args, kwargs in changed:
            node.target, node.args, node.kwargs = target, args, kwargs
        graph.recompile()


def _example_inputs(graph: Graph, data: Iterable | None) -> Any:
    """Inputs of the right shapes: the first batch of ``data``, else the traced shapes."""
    if data is not None:
        return next(take(data, 1, "collapse"))[0]
    inputs = []
    for node in graph.module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise CollapseError(
                f"collapse: cannot tell the shape of input {node.name} of {graph.name}; pass "
                "data=... (one batch is enough: only its shapes and integer inputs are used)"
            )
        shape = [s if isinstance(s, int) else s.node.hint for s in value.shape]
        inputs.append(torch.zeros(shape, dtype=value.dtype, device=value.device))
    return tuple(inputs)


def _path_grads(graph: Graph, params: list[nn.Parameter], inputs: Any) -> list:
    """∂R/∂ each of ``params`` for R = Σ outputs of ``graph`` run on ``inputs`` with every
    floating-point input replaced by ones (None where R does not use one)."""
    ones = torch.utils._pytree.tree_map(
        lambda x: torch.ones_like(x, dtype=torch.float64)
        if isinstance(x, torch.Tensor) and x.is_floating_point() else x, inputs)
    outputs = [x for x in torch.utils._pytree.tree_leaves(call(graph.module, ones))
               if isinstance(x, torch.Tensor) and x.is_floating_point()]
    total = sum(x.sum() for x in outputs)
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        return [torch.zeros_like(p) for p in params]  # no output depends on a mask
    return list(torch.autograd.grad(total, params, allow_unused=True))


def effective_masks(graph: Graph, data: Iterable | None = None) -> dict[str, torch.Tensor]:
    """Write ``effective`` (bool, True = kept and on an input→output path) on every masked
    weight node; returns them by name. ``data``: one batch gives the input shapes and integer
    inputs (else the shapes the graph was traced with); see the module doc for the method."""
    masked = [n for n in graph.weight_nodes() if "mask" in meta.entries(n)]
    if not masked:
        return {}
    whole = _example_inputs(graph, data)
    tensors = [x for x in torch.utils._pytree.tree_leaves(whole) if isinstance(x, torch.Tensor)]
    # every sample of all-ones inputs is the same one: two give the counts' signs the whole
    # batch gives (integer inputs, token ids, pick their rows: those are run whole)
    cut = (cut_batch(graph.module, whole, positions=False)
           if all(x.is_floating_point() for x in tensors) else whole)
    with ExitStack() as stack:
        stack.enter_context(graph.mode(batch_norm=False, dropout=False))
        stack.enter_context(_pooling_as_average(graph))
        params = stack.enter_context(_connectivity_weights(graph, masked))
        try:
            grads = _path_grads(graph, params, cut)
        except Exception:  # noqa: BLE001 - a guard the bounds did not show: the whole batch
            if cut is whole:
                raise
            grads = _path_grads(graph, params, whole)
    result = {}
    for node, grad in zip(masked, grads):
        mask = meta.entries(node)["mask"]
        if grad is None:
            grad = torch.zeros(mask.shape, dtype=torch.float64)
        if not torch.isfinite(grad).all():
            raise CollapseError(
                f"collapse: the path counts of {node.target} overflow float64 (the network is "
                "too deep or wide for exact counting); effective sparsity is not available"
            )
        result[node.target] = meta.entries(node)[EFFECTIVE] = mask & (grad > 0).to(mask.device)
    return result


def collapse_summary(graph: Graph) -> dict[str, Any]:
    """Per-layer and total counts from the ``mask`` and ``effective`` metadata: ``layers``
    (name -> numel, kept, effective, effective_fraction, empty, disconnected), ``empty`` and
    ``disconnected`` (layer names) and ``totals``. JSON-ready."""
    layers = {}
    for node in graph.weight_nodes():
        entry = meta.entries(node)
        if "mask" not in entry or EFFECTIVE not in entry:
            continue
        kept, effective = int(entry["mask"].sum()), int(entry[EFFECTIVE].sum())
        layers[node.target] = {
            "numel": entry["mask"].numel(), "kept": kept, "effective": effective,
            "effective_fraction": effective / kept if kept else None,
            "empty": kept == 0, "disconnected": kept > 0 and effective == 0,
        }
    numel = sum(r["numel"] for r in layers.values())
    kept = sum(r["kept"] for r in layers.values())
    effective = sum(r["effective"] for r in layers.values())
    return {
        "layers": layers,
        "empty": [name for name, r in layers.items() if r["empty"]],
        "disconnected": [name for name, r in layers.items() if r["disconnected"]],
        "totals": {
            "numel": numel, "kept": kept, "effective": effective,
            "sparsity": 1.0 - kept / numel if numel else 0.0,
            "effective_sparsity": 1.0 - effective / numel if numel else 0.0,
            "effective_fraction": effective / kept if kept else None,
        },
    }


@dataclass(frozen=True)
class Collapse(Pass):
    """Report empty layers and effective sparsity (kept weights on an input→output path)."""

    name: ClassVar[str] = "collapse"
    kind: ClassVar[Literal["analysis"]] = "analysis"
    requires: ClassVar[tuple[str, ...]] = ("mask",)
    provides: ClassVar[tuple[str, ...]] = (EFFECTIVE,)

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        effective_masks(graph, ctx.data)
        summary = collapse_summary(graph)
        totals = summary["totals"]
        if summary["empty"] or summary["disconnected"]:
            log.warning(
                "layer collapse: %d empty and %d disconnected layer(s) (%s); only %d of %d kept "
                "weights are on an input→output path", len(summary["empty"]),
                len(summary["disconnected"]),
                ", ".join(summary["empty"] + summary["disconnected"]),
                totals["effective"], totals["kept"],
            )
        return PassResult(modified=False, info=summary)


def report_summary(report: dict[str, Any]) -> dict[str, Any] | None:
    """The :func:`collapse_summary` that the last ``collapse`` pass of a report's pipeline
    recorded (``report.json`` keeps each pass's info), or None when none ran."""
    for step in reversed(report.get("pipeline", [])):
        info = step.get("info")
        if step.get("name") == Collapse.name and isinstance(info, dict) and "layers" in info:
            return info
    return None


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal: effective sparsity, empty and disconnected layers."""
    totals = summary["totals"]
    line = (f"effective: {totals['effective']:,} of {totals['kept']:,} kept weights on an "
            f"input→output path (effective sparsity {totals['effective_sparsity']:.2%})")
    for key in ("empty", "disconnected"):
        if summary[key]:
            line += f"; {key}: {', '.join(summary[key])}"
    return line
