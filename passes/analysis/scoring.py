"""The autograd scoring loop every gradient-based criterion shares.

:func:`backward_sums` runs one forward and one backward per batch on the graph itself and sums a
per-batch term over the batches: the gradient g_b (``snip``, ``gradient``, ``snip-momentum``,
GraSP's g), or, with ``second``, a term computed from gradients that keep their graph, so that
it can differentiate them again (``snip2``'s Hessian diagonal, GraSP's Hessian-vector product).
It runs inside :func:`scoring`, which leaves parameters, buffers, ``requires_grad`` flags,
``.grad`` and the graph's mode bit-identical.

**Data parallel** (``over_ranks``): every rank runs the loop on its own batches, then the sums
are added up over the ranks *before* the final step, so the result is what one process scoring
all the ranks' batches computes (up to the order of float additions): the signed sums Σ_b t_b
for ``abs-of-sum`` and ``sum`` (|Σ_r Σ_b t_b ⊙ w|), the per-rank Σ_b |t_b ⊙ w| for
``sum-of-abs``. Every rank gets the same all-reduced tensors, so the same scores.

:func:`module_backward_sums` is the same loop run eagerly on an ``nn.Module`` with
``loss.backward()``, for models that cannot be traced because their parameters are sharded
(FSDP2, tensor parallel): it reads each parameter's local shard and the local shard of its
gradient, which FSDP2 has already reduced over the ranks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import Node

from chop.errors import DataError, InternalError
from chop.ir.graph import Graph
from chop.ir.masks import gradient_masker, passed_through
from chop.kernels import distributed
from chop.pipeline.batches import batch_loss

Loss = Callable[[Any, Any], torch.Tensor]
Batch = tuple[Any, Any]
Grads = Sequence[torch.Tensor | None]
Accumulate = Literal["abs-of-sum", "sum-of-abs", "sum"]


@contextmanager
def scoring(graph: Graph, nodes: list[Node], *, bn: str = "eval") -> Iterator[list[nn.Parameter]]:
    """Score ``nodes``' parameters on the graph itself: yields them with ``requires_grad`` on,
    BatchNorm in ``bn`` mode and dropout off; afterwards restores the flags, every buffer
    (BatchNorm running statistics and counters) and the graph's mode. Use only
    ``torch.autograd.grad`` inside, never ``backward()``, so ``.grad`` stays untouched. A
    masked weight whose mask node passes it through (inside ``fast_masks``) gets its gradient
    multiplied by its mask, as the mask node would.

    Buffers are saved by copy only where scoring may change them. An exported graph has no
    control flow, so which buffers a forward and backward change is a fact of the graph and
    the mode, and the version counters of the buffers show it, except for the running
    statistics that batch_norm (in train mode) and instance_norm update inside their kernels.
    So with ``bn=eval`` and no instance_norm keeping statistics, the first scoring of a graph
    copies every buffer and records which ones changed (none: eval-mode BatchNorm reads its
    statistics, its counter update is switched off); later ones copy only those and check by
    the counters that no other buffer changed. Otherwise every buffer is copied each time."""
    params = [graph.parameter(n) for n in nodes]
    memo = graph.memo()
    if "buffer slots" not in memo:
        memo["buffer slots"] = [(m, name) for m in graph.module.modules()
                                for name, b in m._buffers.items() if b is not None]
        memo["statistics in kernels"] = any(  # running_mean given
            n.args[3] is not None for n in graph.module.graph.find_nodes(
                op="call_function", target=torch.ops.aten.instance_norm.default))
    # the lean code (Graph.mode) costs about a recompile to generate, which pays off from the
    # second scoring of a graph on (a Pruner, iterative SNIP, the small models whose ops are
    # cheap); a graph scored once, a large model pruned in one go, runs its plain code
    lean = memo.get("scorings", 0) > 0
    memo["scorings"] = memo.get("scorings", 0) + 1
    buffers = [m._buffers[name] for m, name in memo["buffer slots"]]  # read afresh
    counted = bn == "eval" and not memo["statistics in kernels"]  # the counters tell
    changing = memo.get(("scoring changes", bn)) if counted else None  # buffer indices
    versions = [b._version for b in buffers]
    saved = [(i, buffers[i].clone()) for i in (range(len(buffers)) if changing is None
                                               else changing)]
    # the exported module checks the structure of every call's inputs in a forward pre-hook;
    # batch_loss turns a mismatch into a DataError anyway, so skip that per-call cost here
    validate = getattr(graph.module, "validate_inputs", None)
    frozen = [p for p in params if not p.requires_grad]  # most already require grad
    done, hooks = False, []
    try:
        for p in frozen:
            p.requires_grad_(True)
        scored = {id(p) for p in params}  # gradients as the masked graph's mul gives them
        hooks = [weight.register_hook(gradient_masker(mask))
                 for weight, mask in passed_through(graph) if id(weight) in scored]
        if validate:  # a plain attribute: set without nn.Module.__setattr__'s checks
            graph.module.__dict__["validate_inputs"] = False
        with graph.mode(batch_norm=bn == "train", dropout=False, lean=lean):
            yield params
        done = True
    finally:
        for hook in hooks:
            hook.remove()
        if validate:
            graph.module.__dict__["validate_inputs"] = validate
        changed = [i for i, (b, v) in enumerate(zip(buffers, versions)) if b._version != v]
        for p in frozen:
            p.requires_grad_(False)
        if saved:
            with torch.no_grad():
                for i, original in saved:
                    buffers[i].copy_(original)
        if counted and changing is None and done:
            memo[("scoring changes", bn)] = changed
        elif changing is not None and changed and not set(changed) <= set(changing):
            names = [memo["buffer slots"][i][1] for i in sorted(set(changed) - set(changing))]
            raise InternalError(
                f"scoring changed buffers it had not changed before ({', '.join(names)}) and "
                "could not restore them; this is a bug in chop (please report it with the model)")


@contextmanager
def differentiable_twice() -> Iterator[None]:
    """Run attention with the math kernel: the fused CPU/GPU kernels have no double backward,
    which second-order criteria (Hessian-vector products) need."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


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
    """The scalar loss of ``module`` on each batch (see :func:`~chop.pipeline.batches.batch_loss`),
    as a 0-dim floating-point tensor."""
    scale = None if temperature == 1.0 else lambda out: scaled_outputs(out, temperature, who)
    for index, (inputs, targets) in enumerate(batches):
        value = batch_loss(module, inputs, targets, loss, who, transform=scale)
        if not value.is_floating_point():
            raise DataError(
                f"{who}: the loss of batch {index} is a {str(value.dtype).removeprefix('torch.')}"
                " tensor; it must be a real floating-point scalar (an accuracy or a count "
                "cannot be differentiated): return e.g. F.cross_entropy(outputs, targets)"
            )
        # a 0-dim loss (cross-entropy's) as it is: a reshape adds a node to every backward
        yield value if value.dim() == 0 else value.reshape(())


def differentiable(value: torch.Tensor, index: int, who: str,
                   model: nn.Module | None = None) -> torch.Tensor:
    """``value``, the loss of batch ``index``, checked before it is differentiated: it must
    depend on the weights and be finite (a NaN loss gives NaN scores, which rank nothing; a
    non-finite tensor of ``model`` is named as the cause)."""
    if not value.requires_grad:
        raise DataError(
            f"{who}: the loss of batch {index} does not depend on the model's weights (it is "
            "detached or computed without gradients); compute it from the outputs with torch "
            "ops, without .detach(), .item() or torch.no_grad()"
        )
    # a plain tensor's value read back as a Python float: ~0.3 µs, where torch.isfinite and
    # bool() cost ~8 µs, a share of the small models' scoring (one read-back either way)
    finite = (math.isfinite(value.item()) if type(value) is torch.Tensor
              else bool(torch.isfinite(value)))
    if not finite:
        tensors = [] if model is None else [*model.named_parameters(), *model.named_buffers()]
        bad = next((name for name, t in tensors
                    if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise DataError(
                f"{who}: the loss of batch {index} is {float(value.detach())}, and the model's "
                f"{bad} holds NaN or inf: the checkpoint (or its training) is damaged; load "
                "finite weights")
        raise DataError(
            f"{who}: the loss of batch {index} is {float(value.detach())}; look for NaN or inf "
            "in that batch's inputs and targets, or for a loss that overflows"
        )
    return value


def backward_sums(
    graph: Graph,
    nodes: list[Node],
    batches: Iterable[Batch],
    loss: Loss | None,
    who: str,
    *,
    bn: str = "eval",
    accumulate: Accumulate = "abs-of-sum",
    times_weight: bool = True,
    second: Callable[[Grads, list[nn.Parameter]], Grads] | None = None,
    temperature: float = 1.0,
    over_ranks: bool = False,
) -> list[torch.Tensor]:
    """For each node, the per-batch terms t_b summed over ``batches``: |Σ_b t_b ⊙ w|
    (``abs-of-sum``), Σ_b |t_b ⊙ w| (``sum-of-abs``) or Σ_b t_b ⊙ w (``sum``), without ⊙ w
    unless ``times_weight``. t_b is the gradient g_b = ∂L_b/∂w; with ``second``, the gradients
    keep their graph (``create_graph``, attention on the math kernel) and t_b is
    ``second(grads, weights)`` (None: 0), which may differentiate them again. The logits are
    divided by ``temperature`` before the loss. A weight the loss does not use scores 0.
    ``over_ranks``: the batches of every rank of the process group count (see the module doc).

    One forward and backward per batch on the graph itself; the model is left bit-identical.
    The first batch's own terms become the running sums (no zero-filled accumulators: filling
    fresh memory cost more than the rest of the bookkeeping on BERT-base), and the final
    |sum ⊙ w| is one pass written in the weight's layout."""
    twice = second is not None
    with scoring(graph, nodes, bn=bn) as params, differentiable_twice() if twice else nullcontext():
        sums: list[torch.Tensor | None] = [None] * len(params)
        losses = batch_losses(graph, batches, loss, who, temperature=temperature)
        for index, value in enumerate(losses):
            value = differentiable(value, index, who, graph.module)
            terms = torch.autograd.grad(value, params,
                                        allow_unused=True, create_graph=twice)
            if second is not None:
                terms = [None if t is None else t.detach() for t in second(terms, params)]
            storages = [None if t is None else t.untyped_storage() for t in terms]
            shared = _shared([s.data_ptr() for s in storages if s is not None])
            if accumulate == "sum-of-abs":
                with torch.no_grad():  # terms ⊙ w: w requires grad
                    terms = [None if t is None else _finish(t, p, times_weight,
                                                            _owned(t, s, shared))
                             for t, s, p in zip(terms, storages, params, strict=True)]
            for i, (term, storage) in enumerate(zip(terms, storages, strict=True)):
                if term is None:
                    continue
                if sums[i] is not None:  # terms require no grad: add_ records nothing
                    sums[i].add_(term)
                elif accumulate != "sum-of-abs" and not _owned(term, storage, shared):
                    sums[i] = term.clone()  # the first term becomes the running sum
                else:
                    sums[i] = term
    with torch.no_grad():
        if over_ranks:  # every rank reduces the same list, even where its loss left a None
            sums = [torch.zeros_like(p) if t is None else t for t, p in zip(sums, params)]
            distributed.sum_over_ranks(
                sums, what=f"{who}: summing the scores over the ranks",
                agree=f"{who}{{accumulate={accumulate}, times_weight={times_weight}, "
                      f"temperature={temperature}, second order={second is not None}}}")
        if accumulate != "sum-of-abs":  # |sum ⊙ w| in place, one foreach op for many weights
            same = [t is not None and t.stride() == p.stride() and t.dtype == p.dtype
                    for t, p in zip(sums, params)]
            if all(same):  # the usual case: every weight was used, each sum in its layout
                if times_weight:
                    torch._foreach_mul_(sums, params)
                if accumulate == "abs-of-sum":
                    torch._foreach_abs_(sums)
                return sums
            if times_weight and any(same):
                torch._foreach_mul_([t for t, ok in zip(sums, same) if ok],
                                    [p for p, ok in zip(params, same) if ok])
            if accumulate == "abs-of-sum" and any(same):
                torch._foreach_abs_([t for t, ok in zip(sums, same) if ok])
            sums = [t if ok or t is None else
                    _finish(t, p, times_weight, owned=True, absolute=accumulate == "abs-of-sum")
                    for t, p, ok in zip(sums, params, same)]
        return [torch.zeros_like(p) if t is None else t for t, p in zip(sums, params)]


@contextmanager
def module_scoring(module: nn.Module, params: list[nn.Parameter], *, bn: str = "eval"
                   ) -> Iterator[None]:
    """:func:`scoring` for an eager ``nn.Module`` scored with ``loss.backward()``: inside,
    ``params`` require gradients, every ``.grad`` is None, BatchNorm runs in ``bn`` mode and
    every other module (dropout) in eval mode; afterwards the ``.grad`` of every parameter,
    the flags, every buffer and every module's mode are restored."""
    everything = list(module.parameters())
    grads = [p.grad for p in everything]
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in module.modules()]
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        for p in everything:
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        for m, _ in modes:
            m.training = bn == "train" and isinstance(m, nn.modules.batchnorm._BatchNorm)
        yield
    finally:
        with torch.no_grad():
            for p, grad in zip(everything, grads):
                p.grad = grad
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for m, training in modes:
                m.training = training
            for buffer, original in saved:
                buffer.copy_(original)


def module_backward_sums(
    module: nn.Module,
    params: list[nn.Parameter],
    batches: Iterable[Batch],
    loss: Loss | None,
    who: str,
    *,
    bn: str = "eval",
    accumulate: Literal["abs-of-sum", "sum-of-abs"] = "abs-of-sum",
    times_weight: bool = True,
) -> list[torch.Tensor]:
    """:func:`backward_sums` (first order) on an eager module with ``loss.backward()``:
    |Σ_b g_b ⊙ w| or Σ_b |g_b ⊙ w| (|g| without ``times_weight``) for the local shard of each
    parameter (a DTensor's ``to_local()``, a plain tensor whole), from the local shard of its
    ``.grad``. Under FSDP2 the gradient of a backward is already reduced over the ranks (their
    batches together, divided by the number of ranks by default), so nothing else is summed;
    the scale does not change a ranking. The scores are written into the gradients' memory,
    which scoring then drops (the ``.grad`` from before is restored): the model is left
    bit-identical."""
    with module_scoring(module, params, bn=bn):
        sums: list[torch.Tensor | None] = [None] * len(params)
        for index, value in enumerate(batch_losses(module, batches, loss, who)):
            try:
                differentiable(value, index, who).backward()
            except RuntimeError as e:
                if not distributed.is_collective_failure(e):
                    raise
                raise distributed.collective_failure(
                    e, "a collective of the model's backward", who) from e
            if accumulate == "sum-of-abs":  # take each batch's term, then clear the gradients
                with torch.no_grad():
                    for i, p in enumerate(params):
                        grad = distributed.local_grad(p)
                        if grad is not None:
                            term = _finish(grad, distributed.local(p), times_weight, owned=True)
                            sums[i] = term if sums[i] is None else sums[i].add_(term)
                for p in module.parameters():
                    p.grad = None
        with torch.no_grad():
            if accumulate == "abs-of-sum":  # autograd summed the batches' gradients in .grad
                grads = [distributed.local_grad(p) for p in params]
                sums = [None if g is None else _finish(g, distributed.local(p), times_weight,
                                                       owned=True)
                        for g, p in zip(grads, params)]
            return [torch.zeros_like(distributed.local(p)) if t is None else t
                    for t, p in zip(sums, params)]


def _shared(pointers: list[int]) -> set[int]:
    """The values that occur more than once in ``pointers``."""
    seen: set[int] = set()
    shared = set()
    for pointer in pointers:
        (shared if pointer in seen else seen).add(pointer)
    return shared


def _owned(grad: torch.Tensor, storage: torch.UntypedStorage, shared: set[int]) -> bool:
    """Whether ``grad`` (over ``storage``) may be edited in place: it alone covers its whole
    storage, densely (a transposed layout is fine), and no other returned gradient shares that
    storage (``shared``: the storages of several; autograd can hand two parameters the same
    tensor, e.g. for ``(a + b) * x``, and returns stride-0 expanded gradients for parameters
    that are only summed)."""
    if (storage.data_ptr() in shared or grad.storage_offset() != 0
            or storage.nbytes() != grad.numel() * grad.element_size()):
        return False
    if grad.is_contiguous():
        return True
    order = sorted(range(grad.dim()), key=grad.stride, reverse=True)
    return grad.permute(order).is_contiguous()


def _finish(
    total: torch.Tensor, p: torch.Tensor, times_weight: bool, owned: bool, absolute: bool = True
) -> torch.Tensor:
    """|total ⊙ p| (or |total|; without ``absolute`` the signed value) in p's memory layout: in
    place when ``total`` is owned and already has that layout (one pass, no fresh memory), else
    into a new tensor shaped like ``p``."""
    out = total if owned and total.stride() == p.stride() else torch.empty_like(p)
    if times_weight:
        torch.mul(total, p, out=out)
    elif out is not total:
        out.copy_(total)
    return out.abs_() if absolute else out
