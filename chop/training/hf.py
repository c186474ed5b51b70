"""Hugging Face ``transformers``: :class:`SNIPCallback`, SNIP at the first training step.

::

    from chop.training.hf import SNIPCallback

    batch = next(iter(trainer.get_train_dataloader()))       # or any batch of model inputs
    trainer.add_callback(SNIPCallback(representative_batch=batch, sparsity=0.9))
    trainer.train()

At the first training step the callback traces the Trainer's model with :func:`chop.trace` on
the representative batch, scores it with ``snip`` and masks it with ``mask`` (exact kept
counts), then keeps the masks applied to the model's own parameters: pruned gradients are zeroed
as backward accumulates them (so the Trainer's gradient clipping sees the pruned model's
gradients) and pruned weights re-zeroed after each optimizer step. All of it is a
:class:`~chop.training.pruner.Pruner` on the plain module (see there for why masks are applied in place
rather than with parametrizations); pass ``end_step``/``frequency``/``schedule`` to raise the
sparsity during training instead of pruning once.

The loss SNIP differentiates is the model's own (``outputs.loss``, what the Trainer trains), so
the batch must hold ``labels``; pass ``loss=callable(outputs, labels)`` to use another.
``transformers`` is an optional extra (``pip install chop[hf]``): this module imports it, ``chop``
does not.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from chop.errors import ChopError, DataError
from chop.passes.transform.mask import Mask
from chop.training.pruner import Curve, Pruner

log = logging.getLogger("chop")

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ChopError(
        "chop.training.hf needs transformers: pip install chop[hf] (or pip install "
        "'transformers>=5')"
    ) from e


def _model_loss(outputs: Any, targets: Any) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise DataError(
            "SNIPCallback: the model returned no loss for the representative batch; include "
            "\"labels\" in it, or pass loss=callable(outputs, labels)"
        )
    return loss


class SNIPCallback(TrainerCallback):
    """A ``TrainerCallback`` that prunes the Trainer's model with SNIP at the first step.

    Args:
        representative_batch: a dict of model inputs (as the Trainer's data collator gives
            them), with ``labels`` unless ``loss`` is given; moved to the model's device.
        sparsity: the fraction of the selected weights to prune, in [0, 1); default 0.9, or
            the share an N:M ``granularity`` in ``mask_options`` fixes (0.5 for ``"2:4"``).
        criterion: the criterion pass (``"snip"``, ``"snip{accumulate=sum-of-abs}"``, …).
        loss: ``loss(outputs, labels)``; None means the model's own ``outputs.loss``.
        start_step, end_step, frequency, schedule, initial_sparsity: a
            :class:`~chop.training.pruner.Schedule` in optimizer steps; the default prunes once, to
            ``sparsity``, at step 0.
        mask_options: options of the ``mask`` pass (``scope``, ``include``, ``exclude``…).
    """

    def __init__(
        self,
        representative_batch: Mapping[str, Any],
        sparsity: float | None = None,
        *,
        criterion: str = "snip",
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        start_step: int = 0,
        end_step: int = 0,
        frequency: int = 1,
        schedule: Curve = "cube",
        initial_sparsity: float = 0.0,
        mask_options: Mapping[str, Any] | None = None,
    ):
        if not isinstance(representative_batch, Mapping):
            raise DataError(
                f"SNIPCallback: representative_batch must be a dict of model inputs (e.g. "
                f"input_ids, attention_mask, labels), got {type(representative_batch).__name__}"
            )
        if loss is None and "labels" not in representative_batch:
            raise DataError(
                "SNIPCallback: representative_batch has no \"labels\", so the model cannot "
                "compute its loss; add labels, or pass loss=callable(outputs, labels)"
            )
        self.batch = dict(representative_batch)
        self.loss = loss
        self.options = dict(
            criterion=criterion, schedule=schedule, start_step=start_step, end_step=end_step,
            frequency=frequency, initial_sparsity=initial_sparsity, mask_options=mask_options,
        )
        if sparsity is None:  # 0.9, or the share an N:M granularity fixes
            pattern = Mask.from_options(dict(mask_options or {})).pattern_sparsity()
            sparsity = 0.9 if pattern is None else pattern
        self.sparsity = sparsity
        Pruner(torch.nn.Identity(), sparsity, **self.options)  # validate the options now
        self.pruner: Pruner | None = None
        self._hooks: list[Any] = []  # gradient hooks on the model's parameters

    def _data(self, model: Any, device: torch.device) -> list[tuple[Any, Any]]:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in self.batch.items()}
        # the class's forward (accelerate may wrap the instance's): its named inputs
        params = inspect.signature(type(getattr(model, "module", model)).forward).parameters
        named = {n for n, p in params.items() if n != "self" and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        extra = sorted(k for k in batch if k not in named and k != "labels")
        if named and extra:  # a forward's **kwargs: torch.export cannot take them by name
            log.warning("SNIPCallback: %s of the representative batch %s no input of %s's "
                        "forward; scored without", ", ".join(extra),
                        "is" if len(extra) == 1 else "are", type(model).__name__)
            batch = {k: v for k, v in batch.items() if k not in extra}
        if "use_cache" in named and "use_cache" not in batch:
            batch["use_cache"] = False  # a key/value cache in the outputs does not export
        if self.loss is None:  # the model's own loss: labels go in with the inputs
            return [(batch, None)]
        labels = batch.pop("labels", None)
        return [(batch, labels)]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise ChopError("SNIPCallback: the Trainer gave no model to on_train_begin")
        device = next(model.parameters()).device
        data = self._data(model, device)
        self.pruner = Pruner(
            model, self.sparsity, data=data, loss=self.loss or _model_loss,
            example_inputs=data[0][0], **self.options,
        )
        self.pruner.on_train_begin()
        if state.global_step > 0:  # resume_from_checkpoint: the model holds the pruned zeros
            self.pruner.resume(state.global_step)
        self._remove_hooks()  # of a run that ended without on_train_end
        if self.pruner.sharded is None:  # the Trainer clips before on_pre_optimizer_step
            self._hooks = [p.register_post_accumulate_grad_hook(self.pruner.mask_grad)
                           for p in model.parameters() if p.requires_grad]

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        self._remove_hooks()
        if model is None or self.pruner is None or self.pruner.sharded is not None:
            return
        model = getattr(model, "module", model)
        with torch.no_grad():  # load_best_model_at_end may load a checkpoint from before pruning
            weights = {name: model.get_parameter(name) for name in self.masks}
            back = [name for name, mask in self.masks.items()
                    if bool(weights[name][~mask.to(weights[name].device)].any())]
        if back:
            log.warning(
                "SNIPCallback: the model the Trainer ends with has weights the masks pruned (in %d "
                "layer(s), e.g. %s): it loaded a checkpoint saved before pruning ended "
                "(load_best_model_at_end=%s, best checkpoint %s); save and evaluate only after "
                "the schedule's end_step, or apply the masks again", len(back), back[0],
                getattr(args, "load_best_model_at_end", None),
                getattr(state, "best_model_checkpoint", None))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started().on_step_begin(state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started().on_before_optimizer_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started().on_after_optimizer_step()

    def _started(self) -> Pruner:
        if self.pruner is None:
            raise ChopError("SNIPCallback: a step hook ran before on_train_begin; add the "
                            "callback to the Trainer before trainer.train() starts")
        return self.pruner

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks applied to the model (empty before training starts)."""
        return self.pruner.masks if self.pruner is not None else {}
