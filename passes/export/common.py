"""What every export pass shares: run the rewrite, check it against the masked graph, time it;
and :func:`deployable`, the exported graph without per-call overheads, for serving."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from chop.ir.graph import Graph
from chop.kernels.csr import csr_linear_forward
from chop.kernels.timing import median_seconds
from chop.pipeline.batches import call, check_same_outputs
from chop.pipeline.pass_base import Context


def checked_export(
    graph: Graph, ctx: Context, apply: Callable[[], Any], timing: bool, who: str
) -> tuple[Any, dict[str, Any]]:
    """Run ``apply()`` (the rewrite); when the pipeline has data, compare the outputs in eval
    mode before and after on the first two samples of the first batch
    (:func:`~chop.pipeline.batches.check_same_outputs`: an :class:`~chop.errors.InternalError`
    if they differ), reporting the seconds those two forwards took as ``check_s``, and, with
    ``timing``, report the model's median latency on the whole first batch before and after as
    ``model_latency_us = [before, after]``.

    Two samples, not the whole batch: in eval mode each sample's outputs depend on that sample
    alone, and a rewrite that is wrong is wrong on any sample, so the check costs two small
    forwards instead of two of the batch (most of an export pass's time on a large model).
    Inputs whose tensors do not share one leading batch size are checked whole."""
    if ctx.data is None:
        return apply(), {}
    inputs = next(iter(ctx.data))[0]
    sample = _first_samples(graph, inputs, 2)
    info: dict[str, Any] = {}

    def run() -> Any:
        return call(graph.module, inputs)

    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        start = time.perf_counter()
        before = call(graph.module, sample)
        checking = time.perf_counter() - start
        if timing:
            info["model_latency_us"] = [median_seconds(run) * 1e6]
    result = apply()
    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        start = time.perf_counter()
        after = call(graph.module, sample)
        info["check_s"] = checking + time.perf_counter() - start
        if timing:
            info["model_latency_us"].append(median_seconds(run) * 1e6)
    check_same_outputs(f"the {who} graph", after, before)
    return result, info


def _first_samples(graph: Graph, inputs: Any, count: int) -> Any:
    """``inputs`` cut to their first ``count`` samples when every tensor in them has one
    leading (batch) size above ``count`` and the graph's tensor inputs all have a dynamic
    leading size; otherwise ``inputs`` unchanged."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    sizes = {x.shape[0] if x.dim() else None for x in leaves}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= count:
        return inputs
    vals = [n.meta.get("val") for n in graph.module.graph.find_nodes(op="placeholder")]
    if not all(isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt)
               for v in vals if v is None or isinstance(v, torch.Tensor)):
        return inputs
    return torch.utils._pytree.tree_map(
        lambda x: x[:count] if isinstance(x, torch.Tensor) else x, inputs)


def deployable(graph: Graph) -> GraphModule:
    """``graph.module`` for latency-critical inference, without the fixed costs of each call.

    A new GraphModule over the same parameters and buffers (nothing is copied) that computes
    what ``graph`` computes in eval mode, minus three per-call costs: the input guards of the
    exported module (a ``_guards_fn`` submodule call, ~30 µs; a wrong input shape now fails
    inside an op instead of with torch.export's message), the BatchNorm counter updates, and
    the dispatcher around each ``chop::csr_linear`` (called as the plain
    :func:`~chop.kernels.csr.csr_linear_forward`, ~10 µs less per layer). Inputs and outputs
    keep the graph's calling convention. Inference only: BatchNorm and dropout are fixed in eval
    mode, ``train()`` changes nothing, and sparse layers have no autograd — call it under
    ``torch.inference_mode()``. ``graph`` itself, and its ``.pt2`` export, are unchanged.
    """
    with graph.mode(batch_norm=False, dropout=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation
        fx = copy.deepcopy(graph.module.graph)
    for node in list(fx.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            fx.erase_node(node)
        elif node.target is torch.ops.chop.csr_linear.default:
            node.target = csr_linear_forward
    fx.eliminate_dead_code()  # the eval-mode counter adds nobody reads
    module = GraphModule(graph.module, fx, class_name="Deployable")
    return module.eval()
