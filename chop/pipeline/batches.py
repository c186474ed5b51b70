"""Batches and losses: how passes feed data to a graph.

A batch is ``(inputs, targets)``. ``inputs`` is one tensor, a tuple/list of positional inputs,
or a dict of keyword inputs (``{"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from chop.errors import ChopError, DataError, InternalError
from chop.ir.graph import Graph
from chop.ir.replay import cut_inputs, output_difference
from chop.kernels import distributed


def call(module: Callable, inputs: Any) -> Any:
    """Call ``module`` on one batch's ``inputs`` (tensor, tuple/list, or dict of kwargs)."""
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def cut_batch(module: torch.fx.GraphModule, inputs: Any, *, positions: bool = True) -> Any:
    """One batch's ``inputs`` (as :func:`call` takes them) for the exported ``module`` cut to
    their first samples, and with ``positions`` to the first positions of a dynamic sequence
    (:func:`chop.ir.replay.cut_inputs`): what a comparison of two computations of a model runs
    (the export check, the output files' check), and, without ``positions``, what ``collapse``
    counts paths on. ``inputs`` itself when nothing is cut."""
    if isinstance(inputs, dict):
        return cut_inputs(module, (), inputs, positions=positions)[1]
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    cut = cut_inputs(module, args, {}, positions=positions)[0]
    if cut is args:
        return inputs
    return cut if isinstance(inputs, (tuple, list)) else cut[0]


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: a tensor, ``.logits``/``["logits"]``, or the first item."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits") and outputs.logits is not None:
        return outputs.logits
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise DataError(
        f"cannot find logits in the model's outputs ({type(outputs).__name__}); pass "
        "loss=callable(outputs, targets) that computes the loss from them"
    )


def cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Default loss: cross-entropy of the logits against integer class targets.

    Sequence logits ``(batch, seq, classes)`` with targets ``(batch, seq)`` are flattened;
    targets equal to -100 are ignored, as in Hugging Face models. Float targets (regression,
    soft labels) and class indices outside ``[0, classes)`` are refused with a
    :class:`DataError`: pass a loss for the first, fix the labels or the model for the second.
    """
    logits = logits_of(outputs)
    if not isinstance(targets, torch.Tensor):
        raise DataError(
            f"the default cross-entropy loss needs integer class targets as a tensor, got "
            f"{type(targets).__name__}; pass loss=callable(outputs, targets) for other targets"
        )
    if targets.is_floating_point():
        raise DataError(
            f"the targets are {describe(targets)}, but the default loss is cross-entropy over "
            "integer class indices; for regression or soft labels pass "
            "loss=callable(outputs, targets), e.g. loss=torch.nn.functional.mse_loss"
        )
    if logits.dim() > 2 and targets.dim() == logits.dim() - 1:
        logits, targets = logits.flatten(0, -2), targets.flatten()
    if logits.shape[0] != targets.shape[0]:
        raise DataError(
            f"logits of shape {tuple(logits.shape)} do not match targets of shape "
            f"{tuple(targets.shape)}: the default loss is cross-entropy over classes, so targets "
            "must be class indices with the batch shape; pass loss=callable(outputs, targets) "
            "for other targets"
        )
    if logits.device.type == "cpu" and targets.device.type == "cpu":
        # torch's CPU kernel checks every class index itself, at no extra cost: call it first
        # and explain a failure, rather than check with four extra ops and syncs per call
        try:
            return F.cross_entropy(logits, targets)
        except IndexError:
            _check_classes(logits, targets)
            raise
    _check_classes(logits, targets)  # elsewhere a bad index is a device-side assert
    return F.cross_entropy(logits, targets)


def _check_classes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise :class:`DataError` when a target (other than -100) is not a class of ``logits``."""
    labels = targets[targets != -100]
    classes = logits.shape[-1] if logits.dim() > 1 else 0
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(
            f"the targets hold class {bad}, but the model outputs {classes} classes (logits "
            f"{describe(logits)}): class targets must be in [0, {classes}), or -100 to ignore "
            "a position. Fix the labels, or build the model with as many outputs as classes"
        )


def take(data: Iterable | None, count: int, who: str) -> Iterator[tuple[Any, Any]]:
    """Yield the first ``count`` ``(inputs, targets)`` batches of ``data``, checking each."""
    if data is None:
        raise DataError(
            f"{who} needs data: pass data=... to chop.run, an iterable of (inputs, targets) "
            "batches (a list of tuples or a DataLoader)"
        )
    seen = 0
    for batch in itertools.islice(iter(data), count):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(
                f"{who}: batch {seen} is a {type(batch).__name__}, not an (inputs, targets) pair; "
                "data must yield (inputs, targets) batches"
            )
        seen += 1
        yield batch[0], batch[1]
    if seen < count:
        raise DataError(
            f"{who} asked for {count} batches but data gave {seen}; lower the pass's `batches` "
            "option or provide more batches"
        )


def batch_loss(
    module: Callable,
    inputs: Any,
    targets: Any,
    loss: Callable[[Any, Any], Any] | None,
    who: str,
    *,
    transform: Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """``loss(module(inputs), targets)`` (cross-entropy when ``loss`` is None), checked to be a
    scalar tensor. ``transform`` may rewrite the outputs first (e.g. temperature scaling).

    A failure here is a problem with the data or the loss, not with chop: the model failing on
    ``inputs``, or the loss raising, becomes a :class:`DataError` that says which and how to
    fix it, with the original exception chained.
    """
    try:
        outputs = call(module, inputs)
    except ChopError:
        raise
    except Exception as e:
        if distributed.is_collective_failure(e):  # a sharded model's gather: another rank's
            raise distributed.collective_failure(e, "a collective of the model's forward",
                                                 who) from e
        traced = expected_inputs(module)
        owner = module.module if isinstance(module, Graph) else module  # or a function
        weights = {p.dtype for p in owner.parameters() if p.is_floating_point()} if isinstance(
            owner, torch.nn.Module) else set()
        tensors = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
        given = {x.dtype for x in tensors if x.is_floating_point()}
        weight = str(next(iter(weights))).removeprefix("torch.") if len(weights) == 1 else None
        dtypes = "dtype" in str(e).lower() and weight is not None  # weights of one dtype
        if dtypes and given - weights:
            fix = (f"The model's weights are {weight}: give {weight} inputs (e.g. "
                   f"x.to(torch.{weight}), or save the data file as {weight})")
        elif dtypes and tensors and not given:
            fix = (f"The inputs are integers and the model's weights {weight}: if they are "
                   f"features, not token ids, give {weight} inputs (e.g. x.to(torch.{weight}))")
        else:
            fix = ("Give every batch the structure, dtypes and per-sample shapes of the example "
                   "inputs the model was traced with (only the batch size may differ)")
        raise DataError(
            f"{who}: the model failed on a batch of the data ({type(e).__name__}: "
            f"{_first_line(e)}). The batch's inputs are {describe(inputs)}"
            + (f"; the model was traced with {traced}" if traced else "") + ". " + fix
        ) from e
    if transform is not None:
        outputs = transform(outputs)
    try:
        value = (loss or cross_entropy)(outputs, targets)
    except ChopError:
        raise
    except Exception as e:
        which = "the default cross-entropy loss" if loss is None else "the loss"
        raise DataError(
            f"{who}: {which} raised {type(e).__name__}: {_first_line(e)}. Check the targets "
            f"({describe(targets)})"
            + (" or give a loss of your own (loss=callable(outputs, targets) in Python, "
               "[loss] source in the command line's config)" if loss is None else
               " and the loss function")
        ) from e
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise DataError(
            f"{who}: the loss must return a scalar tensor, got "
            f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}"
        )
    return value


def describe(value: Any) -> str:
    """A short description of a batch's inputs or targets: tensor shapes and dtypes."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


def expected_inputs(module: Any) -> str | None:
    """The inputs a traced module (or :class:`~chop.ir.graph.Graph`) takes, written like
    :func:`describe` with its dynamic dimensions named (``float32[batch, 1, 6, 6]``); None when
    ``module`` is not an fx graph module with shape metadata."""
    graph = getattr(module.module if isinstance(module, Graph) else module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    shown = []
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        dims = ["batch" if i == 0 and not isinstance(d, int) else str(d)
                for i, d in enumerate(value.shape)]
        shown.append(f"{node.name}: {str(value.dtype).removeprefix('torch.')}[{', '.join(dims)}]")
    return ", ".join(shown) or None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def check_same_outputs(what: str, got: Any, expected: Any, *, rtol: float = 1e-4) -> None:
    """Raise :class:`InternalError` unless ``got`` reproduces ``expected`` (two model outputs:
    tensors or nested structures of them) up to float round-off
    (:func:`chop.ir.replay.output_difference`, whose tolerance is relative to each output's
    scale)."""
    problem = output_difference(got, expected, rtol=rtol)
    if problem is not None:
        raise InternalError(
            f"{what} does not reproduce the pruned graph's outputs: {problem}. This is a bug in "
            "chop; please report it with the model and the pipeline."
        )
