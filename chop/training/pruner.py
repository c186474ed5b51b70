"""Pruning during training: a :class:`Schedule` of sparsity over steps, and a framework-agnostic
:class:`Pruner` with step hooks that any training loop (or a Hugging Face callback) calls.

::

    pruner = Pruner(model, 0.9, criterion="snip", schedule="cube", start_step=100,
                    end_step=1000, frequency=100, data=scoring_batches)
    pruner.on_train_begin()
    for step, (x, y) in enumerate(loader):
        pruner.on_step_begin(step, (x, y))
        loss_fn(model(x), y).backward()
        pruner.on_before_optimizer_step()
        optimizer.step()
        pruner.on_after_optimizer_step()
        optimizer.zero_grad()

**Scoring** always runs the registry's passes on a :class:`~chop.ir.graph.Graph`: the criterion
(any analysis pass that provides ``saliency``: ``snip``, ``magnitude``, ``random``,
``snip-momentum``…, written as a pipeline item such as ``"snip{batches=2}"``), then ``mask`` with
the step's sparsity and the ``mask_options`` (scope, include/exclude…). So the kept counts are
exact at every pruning step, as ``mask`` counts them, and progressive pruning never returns a
pruned weight (pruned weights are ranked below kept ones, :func:`pruned_last`; so start the
schedule's ``initial_sparsity`` at the sparsity the model already has). The criterion runs at
each pruning step in :meth:`Pruner.on_step_begin`; an accumulating criterion (``snip-momentum``)
runs at every step in :meth:`Pruner.on_before_optimizer_step` instead, where the training loop's
``.grad`` exists (``score_every_step``). The criterion scores only what ``mask`` can select
(linear and conv weights, unless ``mask_options`` add biases, norms or embeddings). The pass
manager lints a pass's output once while the graph stays as that run left it, so later steps
do not pay for it.

**The eager path.** A plain module pruned element by element with a criterion that needs no
data (``magnitude``, ``snip-momentum{source=grad}``), with no process group, runs no pass per
step: the weights are those ``mask`` selects on the traced graph (found once, with its checks
and errors), and each step scores the module's parameters with the criterion's
:meth:`~chop.passes.analysis.criterion.Criterion.score_module` (their pruned entries are zero
in place, so these are the scores of the graph's masked weights) and selects with the same
exact ranking as ``mask``. The masks, kept counts and warnings are those of running the passes
(a test trains both ways and compares them at every step), with two differences: errors come
without the pass manager's ``pass 'mask':`` prefix, and weights the selection leaves out are not
scored (nor warned about). The graph's metadata and history carry no saliency or masks then,
:attr:`Pruner.masks` does; ``resume(step, masks=...)`` refuses masks of weights the selection
leaves out. Pruning at every step, the passes' own work
per call was most of what the Pruner added to a small model's step.

**Two kinds of model.**

- A :class:`~chop.ir.graph.Graph` (you train ``graph.module``): masks are ``mul(weight, mask)`` nodes
  in the graph, so pruned weights get zero gradient and contribute zero; nothing needs re-applying
  after an optimizer step.
- A plain ``nn.Module``: the Pruner traces it once with :func:`chop.trace` (on ``example_inputs``,
  the first batch of ``data``, or the batch given to :meth:`Pruner.on_step_begin`); the graph
  shares the module's parameters, so scores computed on it are the module's. The masks are kept
  as bool tensors and applied by multiplying the parameters **in place** right after each pruning
  step and after every optimizer step; pruned gradients are zeroed before the optimizer step.
  Momentum and Adam moments that a weight gathered before it was pruned still move it in the
  step; the multiply after the step puts it back to zero. We chose this over
  ``torch.nn.utils.parametrize`` because parametrizations rename the parameters in ``state_dict``
  (``…parametrizations.weight.original``), which breaks checkpoints, optimizers built earlier
  and tracing, while in-place masking leaves the module exactly as it was, only sparser.

**Sharded models.** A module whose parameters are DTensors (FSDP2's ``fully_shard``, a
tensor-parallel plan) is not traced: it is scored on the module itself, one local shard per
rank, and selected exactly over the shards with all-reduced histograms
(:mod:`chop.training.sharded`); the masks are those one process would make on the whole model,
and each rank keeps and applies the masks of its own shards (:attr:`Pruner.masks` is this
rank's shards). Every rank calls the same hooks. Supported criteria: ``magnitude``, ``snip``,
``gradient``, ``snip-momentum``; element granularity. With a process group and an unsharded
model, the criteria sum their scores over the ranks' batches (``distributed=auto``), so every
rank makes the same masks.

**Modes.** ``progressive`` raises the sparsity along the schedule; ``pattern-lock`` never prunes,
it freezes the masks the model starts with (``masks=``, else the graph's ``mask`` metadata, else
the non-zero pattern of the selected weights) and keeps them applied while fine-tuning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from chop.errors import DataError, MissingMetadataError, OptionError, did_you_mean
from chop.ir import meta
from chop.ir.graph import Graph, trace_inputs
from chop.ir.masks import factor, insert_mask, is_mask_of, multiply_masks_, select_weights
from chop.kernels import distributed
from chop.kernels.distributed import local
from chop.kernels.select import numpy_compares, part_counts, split_flat, true_counts
from chop.passes.analysis.criterion import Criterion
from chop.passes.transform.iterative_snip import below_kept, pruned_last
from chop.passes.transform.mask import Mask, ranked_masks, warn_emptied
from chop.pipeline import registry
from chop.pipeline.manager import as_passes, run
from chop.pipeline.pass_base import Context, Pass
from chop.training.schedule import Curve, Schedule
from chop.training.sharded import ShardedModel, is_sharded

log = logging.getLogger("chop")


def criterion_pass(criterion: str | Pass) -> Pass:
    """The criterion as a pass object: a registered analysis pass that provides ``saliency``,
    given as an object or a pipeline item (``"snip{batches=2}"``)."""
    passes = as_passes(criterion)
    if len(passes) != 1 or passes[0].kind != "analysis" or "saliency" not in passes[0].provides:
        scoring = [name for name in registry.providers("saliency")
                   if registry.get(name).kind == "analysis"]
        raise OptionError(
            f"criterion {criterion!s} is not one criterion pass; use one of {', '.join(scoring)}"
            " (with options if needed, e.g. \"snip{batches=2}\")"
        )
    return passes[0]


def _scoring_selected(criterion: Pass, mask_options: Mapping[str, Any]) -> Pass:
    """``criterion`` scoring only linear and conv weights (``params=prunable``) when the mask
    options select no other role: the Pruner would never read the other scores, and computing
    them at every step costs (embedding tables can be most of a model)."""
    others = any(mask_options.get(role) for role in ("biases", "norms", "embeddings"))
    if others or getattr(criterion, "params", None) != "all":
        return criterion
    return criterion.replace(params="prunable")


class Pruner:
    """Prune a model during training along a :class:`Schedule`; see the module doc.

    Args:
        model: a :class:`~chop.ir.graph.Graph` or a plain ``nn.Module`` (trained by the caller).
        sparsity: the target sparsity of the selected weights, in [0, 1).
        criterion: the criterion pass (name, pipeline item like ``"snip{batches=2}"``, or
            object); ignored in ``pattern-lock`` mode.
        schedule: the curve: ``exp``, ``cos``, ``cube`` or ``linear`` (see :class:`Schedule`).
        start_step, end_step, frequency, initial_sparsity: the :class:`Schedule`.
        mode: ``progressive`` (prune along the schedule) or ``pattern-lock`` (freeze the masks).
        mask_options: options of the ``mask`` pass run at each pruning step (``scope``,
            ``include``, ``exclude``, ``biases``…; not ``sparsity``).
        data: ``(inputs, targets)`` batches the criterion scores on (re-iterable); None means
            the batch given to :meth:`on_step_begin`.
        loss: ``loss(outputs, targets)`` for the criterion; None means cross-entropy.
        example_inputs: inputs to trace a plain module with (else the first batch's inputs).
        masks: ``pattern-lock`` only: the masks to freeze, by parameter name (on a sharded
            model: whole, or this rank's shard).
        score_every_step: run the criterion at every step up to end_step (in
            :meth:`on_before_optimizer_step`, when the step's gradients exist) and mask on the
            accumulated scores at pruning steps, as accumulating criteria need; None means
            True for ``snip-momentum`` (e.g. ``"snip-momentum{source=grad}"``, which reads the
            training loop's ``.grad``), else score only at pruning steps.
    """

    def __init__(
        self,
        model: Graph | nn.Module,
        sparsity: float,
        *,
        criterion: str | Pass = "magnitude",
        schedule: Curve = "cube",
        start_step: int = 0,
        end_step: int = 0,
        frequency: int = 1,
        initial_sparsity: float = 0.0,
        mode: Literal["progressive", "pattern-lock"] = "progressive",
        mask_options: Mapping[str, Any] | None = None,
        data: Iterable | None = None,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        example_inputs: Any = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        score_every_step: bool | None = None,
    ):
        if not isinstance(model, (Graph, nn.Module)):
            raise OptionError(f"Pruner needs a chop.Graph or an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # the same parameters; DDP's forward does not export
        if mode not in ("progressive", "pattern-lock"):
            raise OptionError(f"Pruner: unknown mode {mode!r}; use 'progressive' or 'pattern-lock'")
        if masks is not None and mode != "pattern-lock":
            raise OptionError("Pruner: masks= is for mode='pattern-lock'; progressive pruning "
                              "computes its masks with the criterion")
        options = dict(mask_options or {})
        if "sparsity" in options:
            raise OptionError("Pruner: give the sparsity as Pruner(model, sparsity), not in "
                              "mask_options (the schedule sets it at each step)")
        self.mask_options = options
        # validated now; each pruning step makes a copy at its sparsity (an N:M pattern has one)
        pattern = Mask.from_options(options).pattern_sparsity()
        if pattern is not None and not math.isclose(sparsity, pattern, abs_tol=1e-9):
            raise OptionError(
                f"Pruner: granularity {options['granularity']} keeps a fixed share of the "
                f"weights (sparsity {pattern:g}), not {sparsity:g}: ask for {pattern:g} (each "
                "pruning step applies the whole pattern)")
        self._pattern = pattern is not None  # every step selects the whole pattern
        self._selection = selection = Mask.from_options(
            {**options, "sparsity": None if self._pattern else sparsity})
        self.schedule = Schedule(sparsity, schedule, start_step, end_step, frequency,
                                 initial_sparsity)
        self.criterion = (_scoring_selected(criterion_pass(criterion), options)
                          if mode == "progressive" else None)
        self.mode = mode
        if score_every_step is None:
            score_every_step = self.criterion is not None and self.criterion.accumulates
        self.score_every_step = score_every_step
        if data is not None and iter(data) is data:  # a generator: read once, then empty
            raise OptionError(
                f"Pruner: data= is a one-pass iterator ({type(data).__name__}), which the "
                "first trace or scoring would use up; pass batches it can read at every "
                "scoring: a list of (inputs, targets) or a DataLoader")
        self.data, self.loss, self.example_inputs = data, loss, example_inputs
        self.model = model
        self.graph: Graph | None = model if isinstance(model, Graph) else None
        self.sharded = (ShardedModel(model, selection)
                        if self.graph is None and is_sharded(model) else None)
        self.step = 0  # optimizer steps taken (used when hooks get no step)
        self.sparsity = 0.0  # the sparsity of the last pruning step
        self.history: list[dict[str, Any]] = []  # one record per pruning step
        self._locked = dict(masks) if masks is not None else None
        self._masks: dict[str, torch.Tensor] = {}  # plain module: masks on the params' devices
        self._held: torch.Tensor | None = None  # the same, one flat buffer (see _keep)
        self._copied: torch.Tensor | None = None  # a small model's factors (see _keep)
        self._factor_list: list[torch.Tensor] = []  # the factors of _applied, in order
        self._targets: list[nn.Parameter] | None = None  # its parameters, when none is sharded
        self._counts: list[int] | None = None  # the eager path's kept counts of _masks
        self._current: dict[str, torch.Tensor] | None = {}  # the eager path's masks, as last
        self._current_flat: torch.Tensor | None = None  # made (None: made from this, see masks)
        self._applied: list[tuple[nn.Parameter, torch.Tensor]] = []  # factor(_masks) by param
        # (name, owner module's path, attribute, parameter) of each in _applied
        self._owners: list[tuple[str, tuple[str, ...], str, nn.Parameter]] = []
        self._factors: dict[nn.Parameter, torch.Tensor] = {}  # the same, for mask_grad
        self._records: list[Any] = []  # the graph.history records of the last pruning step
        self._scored: list[Any] = []  # those of the last scoring
        self._batch: Any = None  # the batch given to the current step
        self._eager: dict[str, nn.Parameter] | None = None  # see _eager_weights
        self._eager_params: list[nn.Parameter] = []  # its values, and the Context its criterion
        self._no_data = Context(loss=loss)  # scores with (it reads no data)
        self._graph_path = False  # decided (by _eager_weights): every step runs passes
        self._scores: dict[str, torch.Tensor] = {}  # the eager path's last scores, by name

    # -- hooks -------------------------------------------------------------------------------

    def on_train_begin(self, batch: Any = None) -> None:
        """Before the first step: in ``pattern-lock`` mode, freeze and apply the masks."""
        if self.mode == "pattern-lock":
            self._adopt(self._locked, batch)

    def resume(self, step: int, batch: Any = None, *,
               masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Continue a run stopped after ``step`` optimizer steps: the sparsity becomes the
        schedule's at ``step - 1`` and the masks ``masks`` (by parameter name, e.g.
        :attr:`masks` saved with the checkpoint), else the zero pattern of the weights the
        selection covers (a plain module's pruned weights are zeros), so the next step prunes
        exactly as the run that never stopped would (a criterion's scores accumulated over
        earlier steps, as ``snip-momentum``'s, start afresh). On a Pruner that ran on past
        ``step`` (a run rolled back in-process), the records of later steps are dropped, and
        before the first pruning step every weight is kept again.

        Raises:
            DataError: without ``masks``, when the weights are less sparse than the schedule
                was at ``step - 1`` (a :class:`~chop.ir.graph.Graph` masks its weights in the
                graph and leaves them dense, or the checkpoint is not this run's).
        """
        self.step = step
        self._scores = {}
        if self.graph is not None:
            for node in self.graph.weight_nodes():
                meta.entries(node).pop("saliency", None)
        self.history = [record for record in self.history if record["step"] < step]
        if self.mode != "progressive" or step < 1 or (
                self.schedule.last_pruning_step(step - 1) is None):
            if self.mode == "progressive" and self.sparsity > 0:  # nothing was pruned by then
                self.sparsity = 0.0
                kept = {name: torch.ones_like(mask) for name, mask in self.masks.items()}
                if self.sharded is not None:  # this rank's shards, which _keep takes as such
                    self._keep(kept)
                else:
                    self._adopt(kept, batch)
            return
        self.sparsity = self.schedule.sparsity_at(step - 1)
        if masks is None and self.sharded is None:
            found = self._current_masks(self._graph(batch))
            numel = sum(m.numel() for m in found.values())
            zeros = numel - sum(int(m.count_nonzero()) for m in found.values())
            if numel and zeros / numel < self.sparsity - 0.01:
                raise DataError(
                    f"Pruner.resume({step}): the pruned weights are {zeros / numel:.1%} zeros, "
                    f"but the schedule had reached sparsity {self.sparsity:g} by step {step - 1}, "
                    "so the masks cannot be read from the weights (a chop.Graph keeps its "
                    "pruned weights dense behind its masks; or the checkpoint is not this "
                    "run's): save pruner.masks with the checkpoint and pass them, "
                    "resume(step, masks=...)")
        self._adopt(masks, batch)

    def on_step_begin(self, step: int | None = None, batch: Any = None) -> None:
        """Before step ``step`` (default: the count of optimizer steps so far): prune when the
        schedule's sparsity has risen. ``batch`` (``(inputs, targets)``) is used to trace a
        plain module and, when ``data`` is None, to score."""
        if step is not None:
            self.step = step
        self._batch = batch
        self._check_same_parameters()  # at every step: the masks are applied at every step
        if not self.score_every_step:
            self._maybe_prune(score=True)

    def on_before_optimizer_step(self) -> None:
        """After backward: with ``score_every_step``, score (and prune when due); then zero
        the gradients of pruned weights (plain modules)."""
        if self.score_every_step and self.mode == "progressive" and (
            self.step <= self.schedule.end_step
        ):
            self.score(self._batch)
            self._maybe_prune(score=False)
        if isinstance(self.model, Graph):
            return
        if self._targets is not None:  # plain tensors: the step's common case, in one call
            grads = [param.grad for param in self._targets]
            if all(g is not None for g in grads):
                with torch.no_grad():
                    self._multiply(grads, self._factor_list)
                return
        grads = [(local(param.grad), mask) for param, mask in self._applied
                 if param.grad is not None]
        if grads:
            with torch.no_grad():
                self._multiply([g for g, _ in grads], [mask for _, mask in grads])

    def on_after_optimizer_step(self) -> None:
        """After the optimizer step: re-apply the masks (plain modules); count the step."""
        self.apply_masks()
        self.step += 1

    # -- work --------------------------------------------------------------------------------

    def score(self, batch: Any = None) -> None:
        """Run the criterion on the graph (on ``data``, else on ``batch``)."""
        if self.criterion is None:
            raise OptionError("Pruner: mode='pattern-lock' never scores; use mode='progressive' "
                              "with a criterion to score")
        if self.sharded is not None:
            self.sharded.score(self.criterion, self._data(batch), self.loss)
            return
        weights = self._eager_weights(batch)
        if weights is not None:  # its criteria read no data: score_module's setup is not needed
            scores = self.criterion.module_scores(
                self.model, self._eager_params, self._no_data,
                list(self._scores.values()) if self._scores else [None] * len(weights))
            self._scores = dict(zip(weights, scores))  # (in the order of weights)
            return
        graph = self._graph(batch)
        first = len(graph.history)
        self._run(graph, self.criterion, batch)
        # graph.history keeps the last scoring's record: scored at every step, it would grow
        # by one record per training step (the pruning step's own stay, see prune)
        pruning = {id(r) for r in self._records}
        stale = {id(r) for r in self._scored if id(r) not in pruning}
        self._scored = graph.history[first:]
        if stale:
            graph.history[:] = [r for r in graph.history if id(r) not in stale]

    def prune(self, sparsity: float, batch: Any = None, *, score: bool = True
              ) -> dict[str, torch.Tensor]:
        """Mask to ``sparsity`` now, scoring first unless ``score`` is False (the saliency
        already on the graph is used); returns the masks by name (on a sharded model, this
        rank's shard of each)."""
        self._check_same_parameters()
        masks = self._prune(sparsity, batch, score)
        return self.masks if masks is None else masks

    def _prune(self, sparsity: float, batch: Any, score: bool) -> dict[str, torch.Tensor] | None:
        """:meth:`prune`; None on the eager path, whose masks :attr:`masks` makes when asked
        for (a Pruner's step does not)."""
        if not self._pattern and not 0.0 <= sparsity < 1.0:
            self._selection.replace(sparsity=sparsity)  # raises mask's error, before scoring
        if self.sharded is not None:
            return self._prune_sharded(sparsity, batch, score)
        if self._eager_weights(batch) is not None:
            self._prune_eager(sparsity, batch, score)
            return None
        graph = self._graph(batch)
        first = len(graph.history)
        if score:
            self.score(batch)
        step_mask = (self._selection if self._pattern
                     else self._selection.replace(sparsity=sparsity))
        self._select(graph, step_mask, batch)
        # graph.history keeps this step's pass records only: a step supersedes the one before,
        # and a record per pass per step would grow without end over a long training run
        # (self.history keeps one line per step)
        earlier = {id(r) for r in self._records}
        self._records = graph.history[first:]
        if earlier:
            graph.history[:] = [r for r in graph.history if id(r) not in earlier]
        masks = self._current_masks(graph, pattern=False)
        self._keep(masks)
        if self._pattern:  # the whole pattern at once: later steps would select it again
            sparsity = self.schedule.target
        self.sparsity = sparsity
        counted = self._records[-1].info["kept"].values()  # mask's own counts: no extra sync
        self.history.append({"step": self.step, "sparsity": sparsity,
                             "kept": sum(k for k, _ in counted),
                             "numel": sum(n for _, n in counted)})
        return masks

    def mask_grad(self, param: nn.Parameter) -> None:
        """Zero the pruned entries of ``param.grad`` (a plain, unsharded module; nothing for a
        parameter without a mask). A ``register_post_accumulate_grad_hook`` hook: it masks the
        gradients as backward accumulates them, for loops that read them before
        :meth:`on_before_optimizer_step` (the Hugging Face Trainer clips them first)."""
        mask = self._factors.get(param)
        if mask is not None and param.grad is not None:
            with torch.no_grad():
                self._multiply([param.grad], [mask])

    def _multiply(self, tensors: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
        """``tensors[i] *= factors[i]``: a small model's float factors (``_copied``) in one
        multi-tensor multiply, uint8 views by :func:`multiply_masks_` (large ones in pieces)."""
        if self._copied is not None:
            torch._foreach_mul_(tensors, factors)
        else:
            multiply_masks_(tensors, factors)

    def apply_masks(self) -> None:
        """Multiply the plain module's pruned parameters (their local shards) by their masks,
        in place."""
        if isinstance(self.model, Graph) or not self._applied:
            return
        with torch.no_grad():
            self._multiply(self._targets if self._targets is not None
                           else [local(param) for param, _ in self._applied], self._factor_list)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks (bool, True = kept) by parameter name; on a sharded model, this
        rank's shard of each."""
        if self.sharded is not None:
            return dict(self._masks)
        if self._eager is not None:
            if self._current is None:  # the last step's, made from its flat mask when asked
                self._current = dict(zip(self._eager, split_flat(
                    self._current_flat, [p.shape for p in self._eager.values()])))
            return dict(self._current)
        if self.graph is None:
            return {}
        return self._current_masks(self.graph, pattern=False)

    # -- helpers -----------------------------------------------------------------------------

    def _maybe_prune(self, *, score: bool) -> None:
        """Prune when the schedule's sparsity at this step is above the current one."""
        if self.mode != "progressive" or self.schedule.last_pruning_step(self.step) is None:
            return  # nothing is pruned before start_step
        target = self.schedule.sparsity_at(self.step)
        if target > self.sparsity:
            self._prune(target, self._batch, score)

    def _prune_sharded(self, sparsity: float, batch: Any, score: bool) -> dict[str, torch.Tensor]:
        if score:
            self.score(batch)
        options = Mask.from_options({**self.mask_options, "sparsity": sparsity})
        masks = self.sharded.select(sparsity, options, self._masks)
        self._keep(masks)
        self.sparsity = sparsity
        kept, numel = self.sharded.counts(masks)
        self.history.append({"step": self.step, "sparsity": sparsity, "kept": kept,
                             "numel": numel})
        return masks

    def _eager_weights(self, batch: Any) -> dict[str, nn.Parameter] | None:
        """The parameters the selection covers, by name, when this Pruner scores and selects
        on the module itself at each step (its eager path), else None.

        A plain module pruned element by element with a criterion that needs no data
        (``magnitude``, ``snip-momentum{source=grad}``) and no process group takes this path:
        the criterion's :meth:`~chop.passes.analysis.criterion.Criterion.score_module` on
        the parameters (whose pruned entries are zero in place, so the scores are those the
        graph's masked weights get) and :func:`~chop.passes.transform.mask.ranked_masks`
        over them, with no pass run, graph metadata or mask node per step. A Pruner that
        prunes at every step spends most of a small model's step in those. The weights are
        those ``mask`` selects on the traced graph (the same roles, checks and errors); the
        masks and counts are those of the graph's passes."""
        if self._eager is not None or self._graph_path:
            return self._eager
        criterion = self.criterion
        self._graph_path = not (
            isinstance(criterion, Criterion) and not isinstance(self.model, Graph)
            and self.sharded is None and criterion.data_batches() == 0
            and not criterion.normalize and self._selection.granularity == "element"
            and _scores_alike(type(criterion)) and not distributed.active())
        if not self._graph_path:
            nodes = self._selection.selected(self._graph(batch))
            self._eager = {n.target: self.model.get_parameter(n.target) for n in nodes}
            self._eager_params = list(self._eager.values())
        return self._eager

    def _prune_eager(self, sparsity: float, batch: Any, score: bool) -> None:
        """:meth:`prune` on the eager path (:meth:`_eager_weights`)."""
        if score:
            self.score(batch)
        names = list(self._eager)
        if not self._scores:
            raise MissingMetadataError(
                f"Pruner: the weights have no saliency yet; call pruner.score() first (it runs "
                f"{self.criterion}), or prune with score=True")
        options, scores = self._selection, [self._scores[name] for name in names]

        def ranked(pruned_last: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
            ranks = ([below_kept(s, self._masks[n]) for n, s in zip(names, scores)]
                     if pruned_last else scores)  # as Pruner._select ranks
            return ranked_masks(names, ranks, sparsity, options.scope,
                                min_sparsity=options.min_sparsity,
                                max_sparsity=options.max_sparsity, min_keep=options.min_keep,
                                split=False)

        alone = _ranks_alone(options)
        kept, flat = ranked(pruned_last=bool(self._masks) and not alone)
        if self._masks and alone and _came_back(
                [self._held] if self._held is not None else list(self._masks.values()),
                [flat] if flat is not None else kept):
            kept, flat = ranked(pruned_last=True)
        sizes, before = [s.numel() for s in scores], self._counts
        if kept is None and self._held is not None and names == list(self._masks):
            self._held.copy_(flat)  # the same parameters, in order (a flat mask has their sizes)
            self._factors_follow()
        else:
            self._keep(dict(zip(names, kept if kept is not None else split_flat(
                flat, [s.shape for s in scores]))))
        self._counts = true_counts(kept) if kept is not None else part_counts(flat, sizes)
        warn_emptied(names, sizes, self._counts, lambda i: before is None or before[i] > 0)
        self._current = dict(zip(names, kept)) if kept is not None else None
        self._current_flat = flat
        self.sparsity = sparsity
        self.history.append({"step": self.step, "sparsity": sparsity, "kept": sum(self._counts),
                             "numel": sum(sizes)})

    def _run(self, graph: Graph, p: Pass, batch: Any) -> None:
        run(graph, [p], data=self._data(batch), loss=self.loss)

    def _select(self, graph: Graph, step_mask: Mask, batch: Any) -> None:
        """Run ``step_mask`` with pruned weights ranked last (:func:`pruned_last`).

        Ranking them last rewrites every score tensor (a ``where`` over all of them). When the
        selection ranks each unit on its own (element granularity, per layer or globally
        without per-layer bounds) the rewrite changes nothing unless the plain ranking keeps a
        pruned weight: only pruned weights rank lower, so a selection that kept none of them
        is also the top of the rewritten ranking, ties included. So the plain ranking is tried
        first, and the rewrite runs only when a pruned weight came back (or the pattern cannot
        tell)."""
        before = self._current_masks(graph, pattern=False)
        if before and _ranks_alone(step_mask):
            start = len(graph.history)
            with _held_logs() as held:  # shown only if this run's masks are kept
                self._run(graph, step_mask, batch)
            after = self._current_masks(graph, pattern=False)
            if not _came_back(list(before.values()), [after[name] for name in before]):
                for record in held:
                    log.handle(record)
                return  # nothing pruned came back: the same masks as with the rewrite
            del graph.history[start:]  # the discarded run's record: the rewrite's replaces it
            for name in after.keys() - before.keys():  # masked by this run only
                meta.entries(graph.weight_node(name)).pop("mask")
            for name, old in before.items():  # the masks the rewrite ranks by
                meta.entries(graph.weight_node(name))["mask"] = old
        with pruned_last(graph, step_mask.granularity):
            self._run(graph, step_mask, batch)

    def _data(self, batch: Any) -> Iterable | None:
        return self.data if self.data is not None else ([batch] if batch is not None else None)

    def _adopt(self, masks: Mapping[str, torch.Tensor] | None, batch: Any) -> None:
        """Take ``masks`` (None: the masks already on the graph, else the zero pattern of the
        weights the selection covers) as the current masks: into the graph and applied."""
        if self.sharded is not None:
            masks = masks if masks is not None else self.sharded.pattern()
            self._keep({name: self.sharded.local_mask(name, mask) for name, mask in masks.items()})
            return
        graph = self._graph(batch)
        if masks is not None:
            self._check_masks(masks)
        masks = masks if masks is not None else self._current_masks(graph)
        weights = self._eager_weights(batch)
        if weights is None:
            for name, mask in masks.items():
                insert_mask(graph, graph.weight_node(name), mask)
            graph.recompile()
            self._keep(masks)
            return
        # the eager path holds one mask per weight it selects, in its order
        others = [name for name in masks if name not in weights]
        if others:
            raise OptionError(
                f"Pruner: masks= has masks for {', '.join(others)}, which mask_options do not "
                f"select (they select {', '.join(weights)}); select them in mask_options "
                "(include=..., biases=true…) or leave their masks out")
        self._keep({name: masks[name].to(torch.bool) if name in masks
                    else torch.ones(p.shape, dtype=torch.bool) for name, p in weights.items()})
        self._current = {name: self._masks[name].clone() for name in masks}
        self._counts = true_counts(list(self._masks.values()))

    def _check_same_parameters(self) -> None:
        """Raise :class:`DataError` when the plain module's masked parameters are not the ones
        the Pruner holds (each looked up, at every step): ``load_state_dict(assign=True)`` (of
        the model or of one of its modules), a conversion with
        ``set_overwrite_module_params_on_conversion`` or a module replaced made new ones, which
        the masks (and the traced graph) do not reach, so the model would train dense."""
        if isinstance(self.model, Graph) or not self._applied:
            return
        root = self.model
        for name, path, attr, param in self._owners:
            module = root
            for part in path:  # the walk get_submodule makes, without its per-call costs
                module = module._modules.get(part)
                if module is None:  # the module is gone
                    break
            if module is None or module._parameters.get(attr) is not param:
                raise DataError(
                    f"Pruner: the model's parameter {name} is not the one the Pruner masks: "
                    "the parameters were replaced (load_state_dict(assign=True), a conversion "
                    "with torch.__future__.set_overwrite_module_params_on_conversion, or a new "
                    "module); make a new Pruner on the model and call "
                    "resume(step, masks=old_pruner.masks)")

    def _check_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`OptionError` unless every mask names a weight of the (unsharded) model
        and is a bool or 0/1 tensor of that weight's shape."""
        if self.sharded is not None:
            return  # checked against the shards by ShardedModel.local_mask
        graph = self._graph(None)
        names = [n.target for n in graph.weight_nodes()]
        for name, mask in masks.items():
            if name not in names:
                raise OptionError(f"Pruner: masks= has a mask for {name!r}, which is not a "
                                  f"parameter of {graph.name}{did_you_mean(name, names)}")
            weight = graph.parameter(name)
            if not is_mask_of(mask, weight):
                got = (f"{str(mask.dtype).removeprefix('torch.')}{list(mask.shape)}"
                       if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}")
                raise OptionError(f"Pruner: the mask of {name} is {got}, not a bool (or 0/1) "
                                  f"tensor of the parameter's shape {list(weight.shape)}; give "
                                  "one (True = kept)")

    def _keep(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Hold ``masks`` (copies, on the parameters' devices) and apply them."""
        if isinstance(self.model, Graph):
            return
        if masks.keys() == self._masks.keys() and all(
            mask.shape == self._masks[name].shape for name, mask in masks.items()
        ):  # the same parameters as at the last step: update the masks in place
            if masks:  # (none yet: resumed before the first pruning step took effect)
                torch._foreach_copy_([self._masks[name] for name in masks], list(masks.values()))
        else:  # one flat buffer, each mask a view: read whole by a step's came-back check
            devices = {name: local(self.model.get_parameter(name)).device for name in masks}
            self._held = held = None if len(set(devices.values())) > 1 else torch.empty(
                sum(m.numel() for m in masks.values()), dtype=torch.bool,
                device=next(iter(devices.values()), "cpu"))
            parts = (held.split([m.numel() for m in masks.values()]) if held is not None
                     else [None] * len(masks))
            self._masks = {
                name: (part.view(mask.shape).copy_(mask) if part is not None
                       else mask.to(devices[name], copy=True))
                for part, (name, mask) in zip(parts, masks.items())
            }
            # (parameter, mask as a 0/1 factor) pairs, looked up once, not at every step
            params = [self.model.get_parameter(name) for name in self._masks]
            factors = [factor(mask) for mask in self._masks.values()]
            dtypes = {local(p).dtype for p in params}
            self._copied = None
            if held is not None and held.numel() <= _COPIED and len(dtypes) == 1 and (
                    next(iter(dtypes)).is_floating_point):
                # a small model's factors: one copy in the weights' dtype, which torch
                # multiplies by several times faster than by the uint8 view (a mixed-dtype
                # loop), at most _COPIED entries more memory; kept equal to the masks
                self._copied = held.view(torch.uint8).to(next(iter(dtypes)))
                factors = [part.view(f.shape) for part, f in zip(
                    self._copied.split([f.numel() for f in factors]), factors)]
            self._applied = list(zip(params, factors))
            self._owners = [(name, tuple(owner.split(".")) if owner else (), attr, param)
                            for name, param in zip(self._masks, params)
                            for owner, _, attr in [name.rpartition(".")]]
            self._factors = dict(self._applied)
            self._factor_list = factors
            self._targets = None if any(map(distributed.is_dtensor, params)) else params
            self.apply_masks()
            return
        self._factors_follow()

    def _factors_follow(self) -> None:
        """After the held masks changed in place: the factors follow them; apply them."""
        if self._copied is not None:
            self._copied.copy_(self._held.view(torch.uint8))
        self.apply_masks()

    def _current_masks(self, graph: Graph, pattern: bool = True) -> dict[str, torch.Tensor]:
        """Masks in the graph's metadata; with ``pattern`` and none there, the non-zero
        pattern of the weights ``mask_options`` selects."""
        found = {n.target: mask for n in graph.weight_nodes()
                 if (mask := meta.entries(n).get("mask")) is not None}
        if found or not pattern:
            return found
        options = Mask.from_options({**self.mask_options, "sparsity": 0.0})
        nodes = select_weights(graph, options.include, options.exclude, biases=options.biases,
                               norms=options.norms, embeddings=options.embeddings)
        return {n.target: graph.parameter(n).detach() != 0 for n in nodes}

    def _graph(self, batch: Any) -> Graph:
        """The graph to score on; a plain module is traced on first use."""
        if self.graph is not None:
            return self.graph
        inputs = self.example_inputs
        if inputs is None and self.data is not None:
            inputs = next(iter(self.data))[0]
        if inputs is None and batch is not None:
            inputs = batch[0]
        if inputs is None:
            raise DataError(
                "Pruner: to prune a plain nn.Module it traces it once, which needs example "
                "inputs: pass example_inputs=..., data=[(inputs, targets), ...], or the step's "
                "batch to on_step_begin(step, batch)"
            )
        with _unwrapped_forward(self.model):
            self.graph = trace_inputs(self.model, inputs)
        return self.graph


@contextmanager
def _unwrapped_forward(model: nn.Module) -> Iterator[None]:
    """``model`` with its class's forward while traced: accelerate (the Trainer with bf16 or
    fp16) replaces the instance's forward by an autocast wrapper, which exports as one opaque
    node, so no weight would be seen as a layer's; scores are taken in the weights' own dtype."""
    wrapped = model.__dict__.get("forward") if hasattr(model, "_original_forward") else None
    if wrapped is None:
        yield
        return
    del model.forward
    try:
        yield
    finally:
        model.forward = wrapped


_COPIED = 1 << 20  # masked entries up to which the masks are also held as float factors


def _scores_alike(cls: type[Criterion]) -> bool:
    """Whether the criterion class scores a module as it scores a graph: the class that
    defines its ``module_scores`` (not the base's refusal) also defines its ``scores`` (a
    subclass of ``magnitude`` that overrides only ``scores`` scores otherwise)."""
    def owner(name: str) -> type:
        return next(c for c in cls.__mro__ if name in vars(c))
    return owner("module_scores") is owner("scores") is not Criterion


def _ranks_alone(options: Mask) -> bool:
    """Whether ``options`` rank each unit on its own (element granularity, per layer or
    globally without per-layer bounds): then ranking pruned weights last changes the masks
    only where the plain ranking keeps a pruned weight (see :meth:`Pruner._select`)."""
    return options.granularity == "element" and (options.scope == "local" or (
        options.min_sparsity == 0.0 and options.max_sparsity == 1.0 and options.min_keep == 0))


def _came_back(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    """Whether a position the bool masks ``before`` (one per mask of ``after``, or all of
    them as one flat tensor) mask (False) is kept (True) by ``after``, as a Pruner checks at
    every step: by numpy where :func:`~chop.kernels.select.numpy_compares`, part by part
    (:func:`_gained`: no concatenated copy), else by torch in one comparison over all masks
    (mask by mask where they lie on several devices)."""
    if numpy_compares(*before, *after):
        if len(before) == len(after) == 1:  # one flat mask each, as a Pruner's step holds
            return _gained(after[0].numpy().reshape(-1), before[0].numpy().reshape(-1))

        def parts(masks: list[torch.Tensor]) -> Iterator[np.ndarray]:
            for m in masks:
                yield m.numpy().reshape(-1)

        olds, news = parts(before), parts(after)
        old = new = np.empty(0, dtype=bool)
        while True:  # walk both in step: either side may be one flat array or several
            if not old.size:
                old = next(olds, None)
            if not new.size:
                new = next(news, None)
            if old is None or new is None:
                return False
            n = min(old.size, new.size)
            if _gained(new[:n], old[:n]):
                return True
            old, new = old[n:], new[n:]
    if len({m.device for m in (*before, *after)}) > 1:
        return any(bool(torch.gt(n.view(torch.uint8), o.view(torch.uint8)).any())
                   for o, n in zip(before, after, strict=True))
    old, new = (torch.cat([m.reshape(-1) for m in masks]) for masks in (before, after))
    return bool(torch.gt(new.view(torch.uint8), old.view(torch.uint8)).any())


def _gained(new: np.ndarray, old: np.ndarray) -> bool:
    """Whether the flat bool array ``new`` is True where ``old`` is False: eight entries at a
    time, as the bytes of 64-bit words (a bool is the byte 0 or 1), then the rest."""
    if new.size < 1 << 16:  # a few calls' fixed costs are more than the work
        return bool(np.greater(new, old).any())
    words = new.size - new.size % 8
    if np.bitwise_and(new[:words].view(np.uint64), np.invert(old[:words].view(np.uint64))).any():
        return True
    return bool(np.greater(new[words:], old[words:]).any())


@contextmanager
def _held_logs() -> Iterator[list[logging.LogRecord]]:
    """Hold back what chop's logger emits inside the block (a pass run whose result may be
    discarded, whose warnings would then be shown twice); the caller passes the records to
    ``log.handle`` to show them after all."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    log.addFilter(hold)
    try:
        yield held
    finally:
        log.removeFilter(hold)
