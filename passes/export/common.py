"""What every export pass shares: run the rewrite, check it against the masked graph, time it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from chop.errors import InternalError
from chop.ir.graph import Graph
from chop.kernels.timing import median_seconds
from chop.pipeline.batches import call
from chop.pipeline.pass_base import Context


def checked_export(
    graph: Graph, ctx: Context, apply: Callable[[], Any], timing: bool, who: str
) -> tuple[Any, dict[str, Any]]:
    """Run ``apply()`` (the rewrite); when the pipeline has data, compare the first batch's
    outputs in eval mode before and after (fp32 allclose) and, with ``timing``, report the
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
    a, b = (torch.utils._pytree.tree_leaves(o) for o in (after, before))
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and not torch.allclose(x, y, rtol=1e-4, atol=1e-5):
            raise InternalError(
                f"the {who} graph's outputs differ from the masked graph's (max abs difference "
                f"{(x - y).abs().max().item():.3g}); this is a bug in chop, please report it"
            )
    return result, info
