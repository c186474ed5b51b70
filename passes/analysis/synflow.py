"""``synflow``: Iterative Synaptic Flow Pruning (Tanaka et al., NeurIPS 2020), data-free.

The network is linearised: every parameter and floating buffer θ is replaced by |θ| (on float64
copies: the graph's own tensors are never touched, ``torch.func.functional_call``), BatchNorm
runs in eval mode (so it is an affine map of the |running statistics|) and dropout is off. The
input is all ones, of the example input's shape (integer inputs: ones of their dtype). With
R = the sum of all outputs, the score is |∂R/∂θ ⊙ θ|.

The iterative schedule: SynFlow prunes a little at a time, re-scoring the masked network, so
that no layer collapses. Iteration t = 1..T scores the network masked by m_{t−1} (m_0: all kept)
and, for t < T, keeps the top keep^(t/T) fraction of the *prunable* weights (``mask``'s default
selection: linear and conv weights, ranked globally, ``chop.kernels.select.keep_masks``) as m_t, where
keep = 1 − ``sparsity``. The saliency written is the score of iteration T; weights outside
m_{T−1} score 0. So ``mask{sparsity=s}`` afterwards — with the same ``s``, ``scope=global``
and the default selection (no ``include``/``exclude``/``biases``/``norms``/``embeddings``) —
keeps exactly SynFlow's final mask. ``synflow`` cannot see the later ``mask``: set the same
``sparsity`` on both (the value used is reported in the pass's info). ``iterations=1`` (or
``sparsity=0``) is one-shot SynFlow. Internal masks are not kept; masks already in the graph
(earlier ``mask`` runs) apply throughout.

Scores are float64 (``dtype``) and kept in float64: they span many orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from chop.errors import OptionError
from chop.ir.graph import Graph
from chop.ir.masks import select_weights
from chop.kernels.select import keep_masks, kept_count
from chop.passes.analysis.criterion import Criterion
from chop.passes.analysis.functional import (
    dtype_hint,
    functional_forward,
    functional_state,
)
from chop.pipeline.pass_base import Context, option


def example_ones(graph: Graph, dtype: torch.dtype) -> tuple[tuple, dict]:
    """All-ones inputs shaped like the traced example inputs, as ``(args, kwargs)``."""
    leaves = []
    for node in graph.module.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            leaves.append(value)
            continue
        shape = [
            d if isinstance(d, int) else int(getattr(d.node, "hint", None) or 2)
            for d in value.shape
        ]
        kind = dtype if value.dtype.is_floating_point else value.dtype
        leaves.append(torch.ones(shape, dtype=kind, device=value.device))
    spec = getattr(graph.module, "_in_spec", None)
    if spec is None:
        return tuple(leaves), {}
    args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _scores(
    graph: Graph,
    nodes: list[Node],
    weights: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
) -> list[torch.Tensor]:
    """|∂R/∂θ ⊙ θ| for the linearised network with ``masks`` applied to its weights."""
    theta = {
        name: (w * masks[name] if name in masks else w).detach().requires_grad_(True)
        for name, w in weights.items()
    }
    outputs = functional_forward(graph, {**theta, **buffers})(*args, **kwargs)
    leaves = [
        x for x in torch.utils._pytree.tree_leaves(outputs)
        if isinstance(x, torch.Tensor) and x.is_floating_point()
    ]
    r = sum(x.sum() for x in leaves)
    inputs = [theta[n.target] for n in nodes]
    grads = torch.autograd.grad(r, inputs, allow_unused=True)
    return [
        torch.zeros_like(x).detach() if g is None else (g * x).detach().abs()
        for g, x in zip(grads, inputs)
    ]


@dataclass(frozen=True)
class Synflow(Criterion):
    """SynFlow (data-free): |∂R/∂θ ⊙ θ| of the |θ| network, pruned iteratively to `sparsity`."""

    name: ClassVar[str] = "synflow"
    counts: ClassVar[tuple[str, ...]] = ("iterations",)

    sparsity: float = option(0.9, "target sparsity of the following mask pass: set the same value")
    iterations: int = option(100, "scoring rounds T; round t keeps keep^(t/T) (1: one-shot)")
    dtype: Literal["float64", "model"] = option(
        "float64", "compute in float64 (SynFlow's choice: R overflows float32) or the model's dtype"
    )

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError(
                f"synflow: sparsity={self.sparsity} is out of range; it must be in [0, 1) and "
                "equal the sparsity of the mask pass that follows"
            )

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        scored = set(nodes)
        prunable = [n for n in select_weights(graph) if n in scored]
        cast = torch.float64 if self.dtype == "float64" else None
        weights, buffers = functional_state(graph, cast)
        weights = {name: w.abs() for name, w in weights.items()}
        buffers = {name: b.abs() if b.is_floating_point() else b for name, b in buffers.items()}
        args, kwargs = example_ones(graph, cast or next(iter(weights.values())).dtype)
        keep = 1.0 - self.sparsity
        total = sum(weights[n.target].numel() for n in prunable)
        rounds = 1 if self.sparsity == 0.0 else self.iterations
        masks: dict[str, torch.Tensor] = {}
        scores: list[torch.Tensor] = []
        with graph.mode(batch_norm=False, dropout=False), dtype_hint(self.name, cast):
            for t in ctx.track(range(1, rounds + 1), rounds, self.name):
                scores = _scores(graph, nodes, weights, buffers, masks, args, kwargs)
                if t < rounds:
                    by_node = dict(zip(nodes, scores))
                    chosen = [by_node[n] for n in prunable]
                    kept = keep_masks(chosen, kept_count(total, 1.0 - keep ** (t / rounds)))
                    masks = {n.target: m for n, m in zip(prunable, kept)}
        return scores

    def info(self, graph: Graph, nodes: list[Node], scores: list[torch.Tensor]) -> dict[str, Any]:
        return {"sparsity": self.sparsity}


synflow_saliency = Synflow.compute
