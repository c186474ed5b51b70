"""Helpers the criterion passes share.

- which weights a criterion scores (:func:`scored_nodes`, option ``params`` of the criteria);
- a scoring session that leaves the model bit-identical (:func:`scoring`) and the per-batch
  losses it computes (:func:`batch_losses`), with gradients accumulated over batches
  (:func:`accumulated_gradients`);
- a functional view of the graph for criteria that evaluate it on substituted weights
  (:func:`functional_state`, :func:`functional_forward`);
- storing scores (:func:`store_saliency`), normalising them (:func:`normalize_saliency`) and
  comparing two rankings (:func:`spearman`).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import Node

from chop.errors import DataError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import select_weights
from chop.pipeline.batches import batch_loss

Params = Literal["all", "prunable"]
PARAMS_DOC = (
    "weights to score: all (every float parameter, so mask can also select biases/norms) "
    "or prunable (mask's default set: linear and conv weights; cheaper)"
)
Loss = Callable[[Any, Any], torch.Tensor]
Batch = tuple[Any, Any]


def scored_nodes(graph: Graph, params: Params = "all") -> list[Node]:
    """The weight nodes a criterion scores.

    ``"all"`` (the default): every floating-point parameter, so the ``mask`` pass can select
    any of them (biases, norms, embeddings on request) without re-running the criterion.
    ``"prunable"``: only what ``mask`` selects by default (linear and conv weights), which
    saves the work and memory of scoring the rest (embedding tables can be most of a model).
    """
    if params == "prunable":
        return [n for n in select_weights(graph) if graph.parameter(n).is_floating_point()]
    return [n for n in graph.weight_nodes() if graph.parameter(n).is_floating_point()]


def effective_weight(graph: Graph, node: Node) -> torch.Tensor:
    """The weight as the graph computes with it: masked entries are zero."""
    weight = graph.parameter(node).detach()
    mask = meta.entries(node).get("mask")
    return weight * mask if mask is not None else weight


def write_saliency(nodes: list[Node], scores: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store ``scores`` as the ``saliency`` of ``nodes``; returns them by parameter name."""
    for node, score in zip(nodes, scores):
        meta.entries(node)["saliency"] = score
    return {node.target: score for node, score in zip(nodes, scores)}


def store_saliency(
    graph: Graph, nodes: list[Node], scores: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """:func:`write_saliency`, and drop the saliency of every other weight node, so a criterion
    that scores a subset (``params=prunable``) leaves no stale scores of an earlier criterion."""
    chosen = set(nodes)
    for node in graph.weight_nodes():
        if node not in chosen:
            node.meta.get("chop", {}).pop("saliency", None)
    return write_saliency(nodes, scores)


def previous_saliency(nodes: list[Node]) -> list[torch.Tensor] | None:
    """The saliency already on every one of ``nodes``, or None if some node has none."""
    scores = [meta.entries(n).get("saliency") for n in nodes]
    return None if any(s is None for s in scores) else scores


def saliency_source(graph: Graph) -> str:
    """The name of the last pass in ``graph.history`` that provides saliency (or "unknown")."""
    from chop.pipeline import registry

    for record in reversed(graph.history):
        try:
            if "saliency" in registry.get(record.name).provides:
                return record.name
        except Exception:  # a pass that is not registered: not ours to judge
            continue
    return "unknown"


# -- scoring with autograd on the graph itself ---------------------------------------------------


@contextmanager
def scoring(graph: Graph, nodes: list[Node], *, bn: str = "eval") -> Iterator[list[nn.Parameter]]:
    """Score ``nodes``' parameters on the graph itself: yields them with ``requires_grad`` on,
    BatchNorm in ``bn`` mode and dropout off; afterwards restores the flags, every buffer
    (BatchNorm running statistics and counters) and the graph's mode. Use only
    ``torch.autograd.grad`` inside, never ``backward()``, so ``.grad`` stays untouched."""
    params = [graph.parameter(n) for n in nodes]
    flags = [p.requires_grad for p in params]
    saved = [(b, b.clone()) for b in graph.module.buffers()]
    try:
        for p in params:
            p.requires_grad_(True)
        with graph.mode(batch_norm=bn == "train", dropout=False):
            yield params
    finally:
        with torch.no_grad():
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for buffer, original in saved:
                buffer.copy_(original)


@contextmanager
def differentiable_twice() -> Iterator[None]:
    """Run attention with the math kernel: the fused CPU/GPU kernels have no double backward,
    which second-order criteria (Hessian-vector products) need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextmanager
def dtype_hint(who: str, cast: torch.dtype | None) -> Iterator[None]:
    """Turn the dtype errors of a graph that bakes its dtype (``.to(float32)`` casts and dtype
    asserts that torch.export records, e.g. in GPT-2) into an error that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if cast is None or "dtype" not in str(e).lower():
            raise
        raise DataError(
            f"{who}: the graph fixes its dtype (torch.export recorded casts or dtype checks, "
            f"e.g. of attention masks), so it cannot run in {cast}: pass dtype=model. ({e})"
        ) from e


def scaled_outputs(outputs: Any, temperature: float, who: str) -> Any:
    """The model's outputs with the logits divided by ``temperature``: a logits tensor, or a
    copy of a dict-like output (a Hugging Face ``ModelOutput``) with its ``logits`` scaled."""
    if temperature == 1.0:
        return outputs
    if isinstance(outputs, torch.Tensor):
        return outputs / temperature
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        scaled = copy.copy(outputs)
        scaled["logits"] = outputs["logits"] / temperature
        return scaled
    raise DataError(
        f"{who}: temperature={temperature} divides the model's logits, but the model returns a "
        f"{type(outputs).__name__} without a 'logits' entry; pass temperature=1 and a loss that "
        "scales the logits itself"
    )


def batch_losses(
    module: Callable,
    batches: Iterable[Batch],
    loss: Loss | None,
    who: str,
    *,
    temperature: float = 1.0,
) -> Iterator[torch.Tensor]:
    """The scalar loss of ``module`` on each batch (see :func:`~chop.pipeline.batches.batch_loss`)."""
    for inputs, targets in batches:
        yield batch_loss(module, inputs, targets, loss, who,
                         transform=lambda out: scaled_outputs(out, temperature, who))


def grads_or_zeros(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Gradients with None (a parameter the loss does not use) replaced by zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def _owned(grad: torch.Tensor, uses: Counter) -> bool:
    """Whether ``grad`` may be edited in place: it alone covers its whole storage, densely (a
    transposed layout is fine), and no other returned gradient shares that storage (``uses``:
    autograd can hand two parameters the same tensor, e.g. for ``(a + b) * x``, and returns
    stride-0 expanded gradients for parameters that are only summed)."""
    storage = grad.untyped_storage()
    order = sorted(range(grad.dim()), key=grad.stride, reverse=True)
    return (uses[storage.data_ptr()] == 1 and grad.storage_offset() == 0
            and storage.nbytes() == grad.numel() * grad.element_size()
            and grad.permute(order).is_contiguous())


def _score(total: torch.Tensor, p: torch.Tensor, times_weight: bool, owned: bool) -> torch.Tensor:
    """|total ⊙ p| (or |total|) in p's memory layout: in place when ``total`` is owned and already
    has that layout (one pass, no fresh memory), else into a new tensor shaped like ``p``."""
    out = total if owned and total.stride() == p.stride() else torch.empty_like(p)
    if times_weight:
        torch.mul(total, p, out=out)
    elif out is not total:
        out.copy_(total)
    return out.abs_()


def accumulated_gradients(
    graph: Graph,
    nodes: list[Node],
    batches: Iterable[Batch],
    loss: Loss | None = None,
    *,
    bn: str = "eval",
    accumulate: str = "abs-of-sum",
    times_weight: bool = True,
    who: str = "snip",
) -> list[torch.Tensor]:
    """|Σ_b g_b ⊙ w| (``abs-of-sum``) or Σ_b |g_b ⊙ w| (``sum-of-abs``) for each node, with
    g_b = ∂L_b/∂w; without ``times_weight`` the same with g_b alone (|Σ g_b|, Σ |g_b|).

    One forward and backward per batch on the graph itself; the model is left bit-identical.
    The first batch's own gradients become the running sums (no zero-filled accumulators:
    filling fresh memory cost more than the rest of the bookkeeping on BERT-base), and the final
    |sum ⊙ w| is one pass written in the weight's layout."""
    with scoring(graph, nodes, bn=bn) as params:
        sums: list[torch.Tensor | None] = [None] * len(params)
        for value in batch_losses(graph.module, batches, loss, who):
            grads = torch.autograd.grad(value, params, allow_unused=True)
            uses = Counter(g.untyped_storage().data_ptr() for g in grads if g is not None)
            with torch.no_grad():
                for i, (grad, p) in enumerate(zip(grads, params)):
                    if grad is None:
                        continue
                    if accumulate == "sum-of-abs":
                        grad = _score(grad, p, times_weight, _owned(grad, uses))
                    elif sums[i] is None and not _owned(grad, uses):
                        grad = grad.clone()  # the first term becomes the running sum
                    sums[i] = grad if sums[i] is None else sums[i].add_(grad)
    with torch.no_grad():
        return [
            torch.zeros_like(p) if t is None
            else _score(t, p, times_weight, owned=True) if accumulate == "abs-of-sum" else t
            for t, p in zip(sums, params)
        ]


# -- a functional view of the graph ---------------------------------------------------------------


def functional_state(
    graph: Graph, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies of the graph's parameters and buffers by name, floating ones cast to
    ``dtype`` (if given), for :func:`functional_forward`: computing with them never touches the
    graph's own tensors (BatchNorm in train mode updates the copies)."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()

    params = {name: copy(p) for name, p in graph.module.named_parameters()}
    buffers = {name: copy(b) for name, b in graph.module.named_buffers()}
    return params, buffers


def functional_forward(graph: Graph, state: dict[str, torch.Tensor]) -> Callable[..., Any]:
    """``graph.module`` as a function of its inputs that computes with ``state`` (parameter and
    buffer tensors by name) in place of its own; works under ``torch.func.vmap``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(graph.module, state, args, kwargs)

    return forward


def cast_inputs(inputs: Any, dtype: torch.dtype | None) -> Any:
    """``inputs`` with floating tensors cast to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return inputs

    def cast(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return torch.utils._pytree.tree_map(cast, inputs)


# -- scores ----------------------------------------------------------------------------------------


def normalize_saliency(nodes: list[Node]) -> float:
    """Divide the saliency of ``nodes`` by its sum over all of them (ranking unchanged) and
    return that sum (0.0, with the scores left as they are, when it is zero)."""
    scores = [meta.entries(n)["saliency"] for n in nodes]
    total = float(sum(s.double().sum() for s in scores)) if scores else 0.0
    if total != 0.0:
        for node, score in zip(nodes, scores):
            meta.entries(node)["saliency"] = score / total
    return total


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-d tensor, ties given their average rank (float64)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2  # mean of the ranks ends-count+1 .. ends
    result = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    result[order] = average[inverse]
    return result


def spearman(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Spearman rank correlation of two score lists over all their entries together (Pearson
    correlation of average ranks; NaN when either side is constant)."""
    x = ranks(torch.cat([t.detach().reshape(-1).double() for t in a]))
    y = ranks(torch.cat([t.detach().reshape(-1).double() for t in b]))
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")
