"""What every export pass shares: run the rewrite, check it against the masked graph, time it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from chop.ir.graph import Graph
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
