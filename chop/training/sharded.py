"""The :class:`~chop.training.pruner.Pruner`'s eager path for sharded models.

A model whose parameters are DTensors — sharded by FSDP2 (``fully_shard``) or by a
tensor-parallel plan — cannot be captured by ``torch.export``, and no rank holds it whole. So it
is pruned on the module itself, one local shard at a time:

- **Weights**: those ``mask`` selects on a traced graph, told by module type: the weights of
  linear (``nn.Linear``, Hugging Face ``Conv1D``) and conv layers, plus biases, norm weights and
  embeddings on request, filtered by ``include``/``exclude`` on the parameter names.
- **Scores**: the criterion's :meth:`~chop.passes.analysis.criterion.Criterion.score_module`
  gives the score of each local shard (``magnitude``, ``snip``, ``gradient``, ``snip-momentum``:
  forward and backward on the module, gradients reduced by FSDP2 as in training).
- **Selection**: :func:`~chop.passes.transform.mask.layer_counts` over each shard's
  :class:`~chop.kernels.select.Piece` (its box of the whole tensor), with the radix histograms
  all-reduced: the exact global (or per-layer) threshold, ties broken by position in the whole
  tensors, and the per-layer bounds (``min_sparsity``, ``max_sparsity``, ``min_keep``) of whole
  layers. The masks are those one process holding the whole model would make.
- **Masks**: each rank keeps the masks of its shards and applies them to its shards in place.

A parameter that is a plain tensor on a sharded model (left out of the plan) is held whole by
every rank: rank 0's scores are broadcast, so every rank masks it alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch import nn

from chop.errors import DataError, DistributedError, OptionError
from chop.ir.masks import PRUNABLE_ROLES
from chop.kernels import distributed
from chop.kernels.select import mask_counts, whole_numel
from chop.passes.analysis.criterion import Criterion
from chop.passes.transform.iterative_snip import below_kept
from chop.passes.transform.mask import Mask, layer_counts
from chop.pipeline.batches import take
from chop.pipeline.pass_base import Pass

_ROLE_ORDER = ("embedding", "norm", "bias", "conv", "linear", "other")  # as chop.ir.graph
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor."""
    return any(distributed.is_dtensor(p) for p in module.parameters())


def module_weights(module: nn.Module, options: Mask) -> dict[str, nn.Parameter]:
    """The floating parameters ``mask`` with ``options`` would select, by name, told by the
    type of the modules that own them (a tied weight takes its most specific role)."""
    roles: dict[int, list[str]] = {}
    for owner in module.modules():
        for name, p in owner.named_parameters(recurse=False):
            roles.setdefault(id(p), []).append(_role(owner, name))
    wanted = set(PRUNABLE_ROLES) | {
        r for r, on in (("bias", options.biases), ("norm", options.norms),
                        ("embedding", options.embeddings)) if on
    }
    return {
        name: p for name, p in module.named_parameters()
        if p.is_floating_point()
        and min(roles[id(p)], key=_ROLE_ORDER.index) in wanted
        and (options.include is None or re.search(options.include, name))
        and (options.exclude is None or not re.search(options.exclude, name))
    }


def _role(owner: nn.Module, name: str) -> str:
    if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding" if name == "weight" else "other"
    kind = ("norm" if isinstance(owner, _NORMS)
            else "conv" if isinstance(owner, nn.modules.conv._ConvNd)
            else "linear" if isinstance(owner, nn.Linear) or type(owner).__name__ == "Conv1D"
            else "other")
    if kind != "other" and name == "bias":
        return "bias"
    return kind if name == "weight" else "other"


class ShardedModel:
    """The weights, scores and selection of a sharded module; see the module doc.

    Args:
        module: the model, parameters sharded as DTensors.
        options: the ``mask`` options (selection; element granularity only).
    """

    def __init__(self, module: nn.Module, options: Mask):
        if options.granularity != "element":
            raise OptionError(
                f"Pruner: a sharded model is pruned element by element; remove "
                f"granularity={options.granularity!r} from mask_options (or score it unsharded)"
            )
        self.module = module
        self.params = module_weights(module, options)
        if not self.params:
            raise OptionError(
                f"Pruner: mask_options select no weights of the sharded model (include="
                f"{options.include!r}, exclude={options.exclude!r})"
            )
        self.scores: dict[str, torch.Tensor] = {}  # this rank's shard of each score

    def score(self, criterion: Pass, data: Iterable | None,
              loss: Callable[[Any, Any], torch.Tensor] | None) -> None:
        """Score the local shards with ``criterion`` (accumulating criteria add to the scores
        of the last call)."""
        if not isinstance(criterion, Criterion):
            raise OptionError(f"Pruner: {criterion.name} is not a criterion that can score a "
                              "sharded model")
        if getattr(criterion, "accumulate", None) == "sum-of-abs" and _fully_sharded(self.module):
            raise OptionError(
                f"Pruner: {criterion.name}{{accumulate=sum-of-abs}} sums |g·w| per batch of every "
                "rank, but under FSDP each backward's gradient is already the ranks' mean, so "
                "the per-rank terms are gone; use accumulate=abs-of-sum (the default) on a "
                "sharded model"
            )
        data = _same_count_everywhere(criterion, data)
        names = list(self.params)
        scores = criterion.score_module(
            self.module, [self.params[n] for n in names], data, loss,
            [self.scores.get(n) for n in names],
        )
        for name, score in zip(names, scores):
            if not distributed.is_dtensor(self.params[name]):  # held whole by every rank
                distributed.broadcast(score, what=f"Pruner: sharing the scores of {name}")
        self.scores = dict(zip(names, scores))

    def select(self, sparsity: float, options: Mask, masks: Mapping[str, torch.Tensor]
               ) -> dict[str, torch.Tensor]:
        """This rank's shard of each mask at ``sparsity``, selected over the whole model;
        weights already pruned (``masks``) rank below every kept one."""
        if not self.scores:
            raise OptionError("Pruner: the sharded model has no scores yet; score before "
                              "pruning with score=False")
        pieces = []
        for name, param in self.params.items():
            score = self.scores[name]
            if name in masks:
                score = below_kept(score, masks[name])
            pieces.append(distributed.piece(param, score, name))
        kept = layer_counts(
            pieces, sparsity, options.scope, min_sparsity=options.min_sparsity,
            max_sparsity=options.max_sparsity, min_keep=options.min_keep,
            reduce=distributed.count_reducer("Pruner: selecting over the shards"),
        )
        return dict(zip(self.params, kept))

    def counts(self, masks: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """Kept entries and entries of the masked weights, over the whole model."""
        names = list(masks)
        pieces = [distributed.piece(self.params[n], masks[n], n) for n in names]
        kept = mask_counts([masks[n] for n in names], pieces,
                           reduce=distributed.count_reducer("Pruner: counting kept weights"))
        return sum(kept), sum(whole_numel(p) for p in pieces)

    def local_mask(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``mask``, given whole (the parameter's shape) or already as
        this rank's shard."""
        param = self.params.get(name)
        if param is None:
            raise OptionError(f"Pruner: {name} is not one of the weights mask_options select "
                              f"on the sharded model ({', '.join(self.params)})")
        shard = distributed.local(param)
        if tuple(mask.shape) == tuple(shard.shape):
            return mask.to(torch.bool)
        if tuple(mask.shape) != tuple(param.shape):
            raise OptionError(f"Pruner: the mask of {name} has shape {tuple(mask.shape)}; give "
                              f"the whole {tuple(param.shape)} or this rank's {tuple(shard.shape)}")
        box = distributed.piece(param, shard, name)
        index = tuple(slice(o, o + n) for o, n in zip(box.offset, shard.shape))
        return mask[index].to(torch.bool)

    def pattern(self) -> dict[str, torch.Tensor]:
        """The non-zero pattern of each local shard."""
        return {name: distributed.local(p).detach() != 0 for name, p in self.params.items()}


def _fully_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) wraps ``module`` or a submodule: its backward reduces
    the gradients over the ranks."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _same_count_everywhere(criterion: Criterion, data: Iterable | None) -> Iterable | None:
    """``data``'s batches for ``criterion`` (a list), once every rank has said how many it
    scores: a sharded model's ranks run each forward and backward together, so a rank with
    fewer batches left the others waiting in a collective until the process group's timeout
    (30 minutes by default). Different counts are a :class:`DistributedError` on every rank;
    a rank whose data is short says so too (its :class:`DataError`), the others the count."""
    count = criterion.data_batches()
    if not count or not distributed.active():
        return data
    try:
        batches, failure = list(take(data, count, criterion.name)), None
    except DataError as e:
        batches, failure = None, e
    mine = -1 if batches is None else len(batches)
    span = distributed.all_reduce(torch.tensor([mine, -mine]), op="max",
                                  what="Pruner: counting each rank's batches")
    if failure is not None:
        raise failure
    most, fewest = int(span[0]), -int(span[1])
    if most != fewest:
        raise DistributedError(
            f"Pruner: {criterion.name} on rank {distributed.rank()} scores {mine} batch(es), "
            f"but another rank scores {fewest if mine == most else most}"
            + (" (its data ran short)" if fewest < 0 else "")
            + ": the ranks of a sharded model run each forward and backward together, so "
            "give every rank the same `batches` option and enough data (e.g. a "
            "DistributedSampler with drop_last=True)")
    return batches
