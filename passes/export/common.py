"""What every export pass shares: run the rewrite, check it against the masked graph, time it;
and :func:`deployable`, the exported graph without per-call overheads, for serving."""

from __future__ import annotations

import copy
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
    """Run ``apply()`` (the rewrite); when the pipeline has data, compare the first batch's
    outputs in eval mode before and after (:func:`~chop.pipeline.batches.check_same_outputs`:
    an :class:`~chop.errors.InternalError` if they differ) and, with ``timing``, report the
    model's median latency before and after as ``model_latency_us = [before, after]``."""
    if ctx.data is None:
        return apply(), {}
    inputs = next(iter(ctx.data))[0]
    info: dict[str, Any] = {}

    def run() -> Any:
        return call(graph.module, inputs)

    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        before = run()
        if timing:
            info["model_latency_us"] = [median_seconds(run) * 1e6]
    result = apply()
    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        after = run()
        if timing:
            info["model_latency_us"].append(median_seconds(run) * 1e6)
    check_same_outputs(f"the {who} graph", after, before)
    return result, info


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
