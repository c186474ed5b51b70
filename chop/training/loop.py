"""A plain training loop for a masked graph: what ``chop train`` runs.

The masks are ``mul(weight, mask)`` nodes of the graph, so pruned weights get zero gradient and
stay zero; with ``prune_sparsity`` set, a :class:`~chop.training.pruner.Pruner` raises the
sparsity along its schedule while training. Each epoch reports the mean loss, the training
accuracy (for classifiers) and the task metric on the eval set (:func:`evaluate`).

Metrics (:func:`evaluate`), one of :data:`METRICS`:

- ``accuracy``: top-1 (argmax of the logits) over the targets that are not -100, with the mean
  cross-entropy per target; classifiers, sequence or token classification;
- ``perplexity``: exp of the mean cross-entropy per target token (-100 ignored): language
  models, whose targets are the next (or the masked) tokens;
- ``loss``: the mean of a user's ``loss(outputs, targets)`` over the samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from chop.errors import DataError
from chop.ir.graph import Graph
from chop.ir.masks import current_masks
from chop.pipeline.batches import batch_loss, call, cross_entropy, logits_of
from chop.training.pruner import Pruner


@dataclass(frozen=True)
class TrainSpec:
    """``[train]``: the optimizer, its settings, the epochs and the eval split."""

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int | None = None  # None: [data] batch_size
    weight_decay: float = 0.0
    momentum: float = 0.0
    seed: int = 0
    eval_fraction: float = 0.2
    # pruning during training (chop.training.pruner.Pruner), on when prune_sparsity is set
    prune_sparsity: float | None = None
    prune_criterion: str = "magnitude"
    prune_schedule: str = "cube"
    prune_start: int = 0
    prune_end: int = 0
    prune_frequency: int = 1


def take_samples(inputs: Any, index: torch.Tensor) -> Any:
    return torch.utils._pytree.tree_map(
        lambda x: x[index] if isinstance(x, torch.Tensor) else x, inputs
    )


def split(inputs: Any, targets: torch.Tensor, fraction: float, seed: int
          ) -> tuple[tuple[Any, torch.Tensor], tuple[Any, torch.Tensor] | None]:
    """A seeded random split into (train, eval); eval is None when ``fraction`` is 0."""
    count = len(targets)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = math.floor(fraction * count + 0.5)
    if fraction > 0 and not 0 < held < count:
        raise DataError(
            f"[train] eval_fraction = {fraction} of {count} samples leaves "
            f"{'no eval' if held == 0 else 'no training'} samples; change eval_fraction"
        )
    train = (take_samples(inputs, order[held:]), targets[order[held:]])
    return train, ((take_samples(inputs, order[:held]), targets[order[:held]]) if held else None)


def _batches(count: int, size: int, order: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Index batches; a last batch of 1 joins the one before (a traced graph's batch size is
    dynamic from 2 on)."""
    order = torch.arange(count) if order is None else order
    cuts = list(range(0, count, size))
    if len(cuts) > 1 and count - cuts[-1] == 1:
        cuts.pop()
    return [order[a:b] for a, b in zip(cuts, cuts[1:] + [count])]


METRICS = ("accuracy", "perplexity", "loss")


def _scored(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets, one row per target (sequence positions flattened), without the
    targets equal to -100."""
    if logits.dim() > 2 and targets.dim() == logits.dim() - 1:
        logits, targets = logits.flatten(0, -2), targets.flatten()
    kept = targets != -100
    return logits[kept], targets[kept]


def evaluate(graph: Graph, batches: Iterable[tuple[Any, Any]], metric: str = "accuracy",
             loss: Callable[[Any, Any], torch.Tensor] | None = None) -> dict[str, float]:
    """``metric`` (see the module doc) of ``graph`` in eval mode over ``batches``, with the
    mean loss: ``{"accuracy": a, "loss": l}``, ``{"perplexity": p, "loss": l}`` or
    ``{"loss": l}`` (``loss`` is the user's, for ``metric="loss"``; else cross-entropy). Data
    that does not fit the model or the loss is a :class:`~chop.errors.DataError`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    total, correct, count = 0.0, 0, 0
    with torch.no_grad(), graph.mode(batch_norm=False, dropout=False):
        for inputs, targets in batches:
            seen: list[Any] = []
            value = float(batch_loss(graph.module, inputs, targets,
                                     loss if metric == "loss" else None,
                                     "evaluating the held-out batches",
                                     transform=lambda o, seen=seen: seen.append(o) or o))
            if metric == "loss":
                size = len(targets) if isinstance(targets, torch.Tensor) else 1
                total, count = total + value * size, count + size
                continue
            logits, kept = _scored(logits_of(seen[0]), targets)
            total += value * kept.numel()  # cross-entropy is the mean over the scored targets
            correct += int((logits.argmax(-1) == kept).sum())
            count += kept.numel()
    mean = total / max(count, 1)
    if metric == "accuracy":
        return {"accuracy": correct / max(count, 1), "loss": mean}
    if metric == "perplexity":
        return {"perplexity": math.exp(min(mean, 700.0)), "loss": mean}
    return {"loss": mean}


def accuracy(graph: Graph, inputs: Any, targets: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy of ``graph`` in eval mode, over batches of ``batch_size``."""
    batches = [(take_samples(inputs, index), targets[index])
               for index in _batches(len(targets), batch_size)]
    return evaluate(graph, batches, "accuracy")["accuracy"]


def train_graph(
    graph: Graph,
    train: tuple[Any, torch.Tensor],
    evaluation: tuple[Any, torch.Tensor] | None,
    spec: TrainSpec,
    batch_size: int,
    *,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    metric: str = "accuracy",
    track: Callable[[Iterable, int | None, str], Iterable] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``graph.module`` in train mode for ``spec.epochs`` epochs; returns one record per
    epoch: ``epoch``, ``loss`` (the mean training loss), ``train_accuracy`` (with
    ``metric="accuracy"``), ``eval`` (:func:`evaluate` on ``evaluation`` in batches of
    ``batch_size``, or None without it) and ``seconds``. The graph is left in eval mode."""
    user_loss = loss
    loss = loss or cross_entropy
    params = [p for p in graph.module.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    inputs, targets = train
    generator = torch.Generator().manual_seed(spec.seed)
    pruner = _pruner(graph, spec, loss)
    records = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # dropout
        for epoch in range(1, spec.epochs + 1):
            start = time.perf_counter()
            graph.train()
            order = torch.randperm(len(targets), generator=generator)
            batches = _batches(len(targets), batch_size, order)
            total_loss, correct, scored = 0.0, 0, 0
            items = batches if track is None else track(
                batches, len(batches), f"epoch {epoch}/{spec.epochs}"
            )
            for index in items:
                y = targets[index]
                x = take_samples(inputs, index)
                if pruner is not None:
                    pruner.on_step_begin(batch=(x, y))  # prunes when the schedule says so
                outputs = call(graph.module, x)
                value = loss(outputs, y)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if pruner is not None:
                    pruner.on_before_optimizer_step()
                optimizer.step()
                if pruner is not None:
                    pruner.on_after_optimizer_step()
                total_loss += float(value.detach()) * len(index)
                if metric == "accuracy":
                    logits, kept = _scored(logits_of(outputs).detach(), y)
                    correct += int((logits.argmax(-1) == kept).sum())
                    scored += kept.numel()
            graph.eval()
            held = None if evaluation is None else [
                (take_samples(evaluation[0], index), evaluation[1][index])
                for index in _batches(len(evaluation[1]), batch_size)
            ]
            record = {
                "epoch": epoch,
                **({"sparsity": pruner.sparsity} if pruner is not None else {}),
                "loss": total_loss / len(targets),
                **({"train_accuracy": correct / max(scored, 1)} if metric == "accuracy" else {}),
                "eval": evaluate(graph, held, metric, user_loss) if held is not None else None,
                "seconds": time.perf_counter() - start,
            }
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
    return records


def _pruner(graph: Graph, spec: TrainSpec, loss: Callable | None) -> Any:
    """The :class:`~chop.training.pruner.Pruner` of ``[train] prune_*`` (None without prune_sparsity).
    Its schedule starts at the sparsity the graph's masks already have, so progressive pruning
    never gives a pruned weight back."""
    if spec.prune_sparsity is None:
        return None
    masks = list(current_masks(graph).values())
    numel = sum(m.numel() for m in masks)
    initial = 1.0 - sum(int(m.sum()) for m in masks) / numel if numel else 0.0
    pruner = Pruner(
        graph, spec.prune_sparsity, criterion=spec.prune_criterion,
        schedule=spec.prune_schedule, start_step=spec.prune_start, end_step=spec.prune_end,
        frequency=spec.prune_frequency, initial_sparsity=min(initial, spec.prune_sparsity),
        loss=loss,
    )
    pruner.on_train_begin()
    return pruner
