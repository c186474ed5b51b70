"""A plain training loop for a masked graph: what ``chop train`` runs.

The masks are ``mul(weight, mask)`` nodes of the graph, so pruned weights get zero gradient and
stay zero. Training runs inside :func:`fast_masks` (``TrainSpec.fast_masks``, on by default):
the same steps with the masks kept in the weights instead of multiplied in at every forward
(see there; any training loop can use it). With ``prune_sparsity`` set, a :class:`~chop.training.pruner.Pruner` raises the
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

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chop.errors import DataError, OptionError
from chop.ir.graph import COPY_TARGET, Graph
from chop.ir.masks import (
    current_masks,
    factor,
    gradient_masker,
    mask_nodes,
    mask_of,
    multiply_masks_,
    weight_through,
)
from chop.pipeline.batches import batch_loss, call, cross_entropy, logits_of
from chop.training.pruner import Pruner

log = logging.getLogger("chop")


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
    # train with the masks kept in the weights (fast_masks): the same results, faster steps
    fast_masks: bool = True


def _accumulated_masker(mask: torch.Tensor) -> Callable[[nn.Parameter], None]:
    """A post-accumulate-grad hook: ``.grad`` times ``mask``, in place. Once accumulated,
    ``.grad`` is the weight's own tensor (autograd copies a gradient that anything else
    holds), so unlike a tensor hook it needs no new tensor: on a 4096² layer that
    allocation cost as much as the multiply. A ``.grad`` that requires grad (``backward``
    with ``create_graph``) is replaced by the product, which autograd records."""
    def hook(weight: nn.Parameter) -> None:
        grad = weight.grad
        if grad is None:  # an earlier hook took it (an optimizer step in backward)
            return
        if grad.requires_grad:
            weight.grad = grad * factor(mask)
            return
        with torch.no_grad():
            multiply_masks_([grad], [mask])
    return hook


def _grad_hook(weight: nn.Parameter, mask: torch.Tensor) -> Any:
    """Mask ``weight``'s gradients in backward: in place once accumulated, or, when the weight
    already has post-accumulate-grad hooks (which would run first and see them unmasked), in a
    tensor hook before accumulation; returns the handle."""
    if getattr(weight, "_post_accumulate_grad_hooks", None):
        return weight.register_hook(gradient_masker(mask))
    return weight.register_post_accumulate_grad_hook(_accumulated_masker(mask))


# Optimizers whose update of an entry with zero weight, zero gradient and zero state is zero
# (with any of their options): pruned weights stay zero without re-masking after the step.
_ZERO_KEEPING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
# Optimizers (by class name) whose update of an entry reads the whole parameter's norm
_PARAMETER_WIDE = ("adafactor", "lamb", "lars")


class FastMasks:
    """Train a masked graph with its masks kept in the weights; made by :func:`fast_masks`.

    Inside, every mask node ``mul(weight, mask)`` passes its weight through unchanged, so the
    forward reads the weights directly (no multiply, no masked copy held for backward). What
    the mask nodes did is done instead where it costs least:

    - on entry, pruned weights are zeroed in place (``weight.mul_(mask)``, the very values the
      mask node computes) and so is the optimizer state of pruned entries (moments, momentum);
    - in backward, each masked weight's ``.grad`` is multiplied by its mask in place as soon
      as the gradient is accumulated into it (a post-accumulate-grad hook: the mask node's own
      backward, moved onto the weight), so anything between backward and the optimizer step
      (gradient clipping, accumulation) sees the masked graph's gradients. (A weight that
      has post-accumulate-grad hooks already gets a tensor hook instead, so that those hooks
      see masked gradients too.) A gradient that ``torch.autograd.grad`` returns is not
      accumulated, so it is not masked, except in chop's scoring passes, which mask it;
    - after each step of an optimizer other than SGD, Adam and AdamW, the weights are
      multiplied by their masks again (``mul_``). Those three need not: their
      update of an entry with zero weight, zero gradient and zero state is zero.

    So the kept weights see exactly the gradients and updates of the masked graph, the forward
    outputs are bit for bit those of the masked graph, pruned weights are exactly zero and the
    optimizer state of pruned entries stays zero. This holds for optimizers that update each
    entry from that entry's own gradient and state (SGD, Adam and their kin, Adagrad, RMSprop).
    One that scales a parameter's update by the norm of the whole parameter (Adafactor's
    relative step, LAMB's and LARS's trust ratios) reads the pruned entries as zeros here, where
    the masked graph keeps their old values: its kept weights then move differently (a warning
    is logged for those by name); train the plain masked graph to get the masked graph's
    updates. (The plain masked graph lets pruned *weights*
    drift under weight decay, invisibly, since they are multiplied by zero; here they stay 0.)
    A masked weight frozen on entry and unfrozen inside (gradual unfreezing) has its gradient
    masked from the next forward of ``graph.module`` on; a ``graph.copy()`` taken inside is the
    masked graph. On exit the mask nodes multiply again: the graph is the masked graph, with its
    pruned weights zero. When the masks change inside (a :class:`~chop.training.pruner.Pruner`
    pruned, updating the mask buffers in place), call :meth:`refresh` before the next forward.
    """

    def __init__(self, graph: Graph, optimizer: torch.optim.Optimizer | None = None):
        self.graph, self.optimizer = graph, optimizer
        self._nodes: list[Any] = []
        self._handles: list[Any] = []
        self.weights: list[nn.Parameter] = []
        self.masks: list[torch.Tensor] = []  # the graph's mask buffers (updated in place)
        self._frozen: list[tuple[nn.Parameter, torch.Tensor]] = []  # masked, not requiring grad
        self._watch: Any = None  # the forward pre-hook that watches them

    def __enter__(self) -> FastMasks:
        name = type(self.optimizer).__name__
        if any(k in name.lower() for k in _PARAMETER_WIDE):
            log.warning("fast_masks: %s scales updates by whole-parameter norms, which read the "
                        "pruned weights as zeros here but as their old values in the masked "
                        "graph, so training differs from the masked graph's; train without "
                        "fast_masks to match it", name)
        try:
            if self.optimizer is not None and type(self.optimizer) not in _ZERO_KEEPING:
                self._handles.append(self.optimizer.register_step_post_hook(
                    lambda *_: self._mask_weights()))
            self.refresh()
        except BaseException:
            self.__exit__()  # no hook or pass-through node left behind
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for node in self._nodes:
            node.target = torch.ops.aten.mul.Tensor
            node.meta.pop(COPY_TARGET, None)
        if self._nodes:
            self.graph.recompile()
        self._handles, self._nodes, self.weights, self.masks = [], [], [], []
        self._frozen, self._watch = [], None

    def refresh(self) -> None:
        """Take up mask nodes added since (they pass their weight through from now on), and
        zero the pruned weights, their gradients (a Pruner that prunes after backward leaves
        gradients computed under the masks before) and their optimizer state under the
        current masks. A weight that a new mask keeps after an older one pruned it restarts
        from 0 (the masked graph kept its old value)."""
        module, added = self.graph.module, []
        for node in mask_nodes(self.graph):
            if node.target is torch.ops.aten.mul.Tensor:
                weight = module.get_parameter(mask_of(node))
                mask = module.get_buffer(node.args[1].target)
                self._nodes.append(node)
                self.weights.append(weight)
                self.masks.append(mask)
                if weight.requires_grad:  # a frozen weight has no gradient to mask, yet
                    self._handles.append(_grad_hook(weight, mask))
                else:
                    self._frozen.append((weight, mask))
                added.append(node)
        if self._frozen and self._watch is None:  # gradual unfreezing: watch them
            self._watch = module.register_forward_pre_hook(lambda *_: self._unfrozen())
            self._handles.append(self._watch)
        self._mask_weights()
        with torch.no_grad():
            pairs = [(w.grad, mask) for w, mask in zip(self.weights, self.masks)
                     if w.grad is not None]
            multiply_masks_([g for g, _ in pairs], [mask for _, mask in pairs])
        for node in added:
            node.target = weight_through
            node.meta[COPY_TARGET] = torch.ops.aten.mul.Tensor  # a graph.copy() multiplies
        if added:
            self.graph.recompile()
        if self.optimizer is None:
            return
        with torch.no_grad():
            pairs = [(value, mask) for weight, mask in zip(self.weights, self.masks)
                     for value in self.optimizer.state.get(weight, {}).values()
                     if isinstance(value, torch.Tensor) and value.shape == weight.shape]
            multiply_masks_([v for v, _ in pairs], [mask for _, mask in pairs])

    def _unfrozen(self) -> None:
        """Before a forward: mask the gradients of the frozen masked weights that require grad
        now (unfrozen inside the block), as those of the others are."""
        thawed = [(weight, mask) for weight, mask in self._frozen if weight.requires_grad]
        for weight, mask in thawed:
            self._handles.append(_grad_hook(weight, mask))
        if thawed:
            self._frozen = [(w, m) for w, m in self._frozen if not w.requires_grad]

    def _mask_weights(self) -> None:
        with torch.no_grad():
            multiply_masks_(self.weights, self.masks)


def fast_masks(graph: Graph, optimizer: torch.optim.Optimizer | None = None) -> FastMasks:
    """A context in which training ``graph.module`` computes what the masked graph computes,
    with the masks kept in the weights rather than multiplied in at every forward (see
    :class:`FastMasks`)::

        optimizer = torch.optim.AdamW(graph.module.parameters(), lr=1e-4, weight_decay=0.01)
        with fast_masks(graph, optimizer) as fast:
            for x, y in loader:
                loss_fn(graph.module(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        # graph is the masked graph again; its pruned weights are zero

    Give the optimizer that trains the graph (else pruned weights are only zeroed on entry and
    by :meth:`FastMasks.refresh`). Scoring and ``mask`` may run inside (the weights they read
    are the masked ones, and chop's scoring passes mask the gradients they take; one taken by
    your own ``torch.autograd.grad`` is not masked); call ``fast.refresh()`` after masks
    change."""
    return FastMasks(graph, optimizer)


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
            value = float(batch_loss(graph, inputs, targets,
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
    mask_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``graph.module`` in train mode for ``spec.epochs`` epochs; returns one record per
    epoch: ``epoch``, ``loss`` (the mean training loss), ``train_accuracy`` (with
    ``metric="accuracy"``), ``eval`` (:func:`evaluate` on ``evaluation`` in batches of
    ``batch_size``, or None without it) and ``seconds``. The graph is left in eval mode.
    ``mask_options``: the selection of the ``prune_*`` Pruner (``mask`` options but the
    sparsity: the weights it prunes, scope, granularity), as the pipeline's ``mask`` had."""
    user_loss = loss
    loss = loss or cross_entropy
    params = [p for p in graph.module.parameters() if p.requires_grad]
    # torch's fused kernels where they run (one per parameter, not one per op): on CPU also
    # free of the default Adam's slow sqrt of zero moments, which every pruned entry has
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                 for p in params) or None
    if spec.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
            fused=fused)
    else:
        optimizer = torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                     fused=fused)
    inputs, targets = train
    generator = torch.Generator().manual_seed(spec.seed)
    pruner = _pruner(graph, spec, loss, mask_options)
    steps = spec.epochs * len(_batches(len(targets), batch_size))
    if pruner is not None and spec.prune_end > steps - 1:
        reached = pruner.schedule.sparsity_at(steps - 1) if spec.prune_start < steps else None
        log.warning(
            "[train] prune_end = %d is after the run's last step (%d: %d epoch(s) of %d "
            "batches, counted from 0): %s; set prune_end to at most %d, or train longer",
            spec.prune_end, steps - 1, spec.epochs, steps // spec.epochs,
            f"the run stops at sparsity {reached:.3g} of prune_sparsity {spec.prune_sparsity:g}"
            if reached is not None else "prune_start is after it too, so nothing is pruned",
            steps - 1)
    records = []
    fast = fast_masks(graph, optimizer) if spec.fast_masks else contextlib.nullcontext()
    pruned = 0  # pruning steps taken inside fast
    with torch.random.fork_rng(devices=[]), fast:
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
                    pruned = _refresh(fast, pruner, pruned)
                outputs = call(graph, x)  # Graph.__call__: without torch.export's re-flattening
                value = loss(outputs, y)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if pruner is not None:
                    pruner.on_before_optimizer_step()
                    pruned = _refresh(fast, pruner, pruned)
                optimizer.step()
                if pruner is not None:
                    pruner.on_after_optimizer_step()
                step_loss = float(value.detach())
                if not math.isfinite(step_loss):  # nothing is written from a diverged run
                    raise DataError(
                        f"training diverged: the loss of a batch of epoch {epoch} is "
                        f"{step_loss}, and every weight it updated is now NaN or inf; lower "
                        f"the learning rate (lr = {spec.lr}) or look for NaN or inf in the data"
                    )
                total_loss += step_loss * len(index)
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


def _refresh(fast: Any, pruner: Pruner, pruned: int) -> int:
    """After a Pruner hook: when it pruned (its history grew past ``pruned`` steps), take up
    the new masks in ``fast``; returns the pruning steps taken."""
    if isinstance(fast, FastMasks) and len(pruner.history) != pruned:
        fast.refresh()
    return len(pruner.history)


def _pruner(graph: Graph, spec: TrainSpec, loss: Callable | None,
            mask_options: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~chop.training.pruner.Pruner` of ``[train] prune_*`` (None without prune_sparsity).
    Its schedule starts at the sparsity the graph's masks already have, so progressive pruning
    never gives a pruned weight back."""
    if spec.prune_sparsity is None:
        return None
    masks = list(current_masks(graph).values())
    numel = sum(m.numel() for m in masks)
    initial = 1.0 - sum(int(m.sum()) for m in masks) / numel if numel else 0.0
    # each layer's kept count was rounded to a whole number: up to half an entry per layer
    if spec.prune_sparsity < initial - (0.5 * len(masks) / numel if numel else 0.0) - 1e-12:
        raise OptionError(
            f"[train] prune_sparsity = {spec.prune_sparsity} is below the sparsity the model's "
            f"masks already have ({initial:.1%}): pruning during training only raises it; set "
            "prune_sparsity above that, or leave it out to train with the masks as they are"
        )
    pruner = Pruner(
        graph, spec.prune_sparsity, criterion=spec.prune_criterion,
        schedule=spec.prune_schedule, start_step=spec.prune_start, end_step=spec.prune_end,
        frequency=spec.prune_frequency, initial_sparsity=min(initial, spec.prune_sparsity),
        loss=loss, mask_options=mask_options,
    )
    pruner.on_train_begin()
    return pruner
