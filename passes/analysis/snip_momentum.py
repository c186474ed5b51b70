"""``snip-momentum``: SNIP scores averaged over training steps (Intel Neural Compressor).

score_n = alpha·score_{n−1} + beta·|w ⊙ g|, where score_{n−1} is the saliency already on the
weight node (absent: 0) and g the gradient of this step. The defaults (alpha = 1, beta = 0.9)
give the running sum score_{n−1} + 0.9·|w ⊙ g| that the issue specifies; INC's constants
(alpha = 0.9, beta = 1.0) give an exponential moving sum that forgets old steps. Meant for
pruning during training: run it once per step (the ``Pruner`` does) and ``mask`` on the
accumulated scores.

g comes from ``source``: ``data`` computes it like ``snip`` from ``batches`` batches
(|Σ_b g_b ⊙ w|, BatchNorm in ``bn`` mode); ``grad`` reads the ``.grad`` that the training
loop's ``loss.backward()`` left on the parameters (INC scores in ``on_before_optimizer_step``),
with no extra forward or backward. The model is left bit-identical either way.

With a process group (``distributed=auto``), w ⊙ g is summed over the ranks before |·|: for
``source=data`` like ``snip``; for ``source=grad`` too, which under DDP (gradients already
averaged) only scales the score by the number of ranks and without it scores the gradient of
all the ranks' losses. A sharded model (FSDP2) is scored on its local shards, whose gradients
FSDP2 has already reduced.

INC's code (``SnipMomentumCriterion``: ``scores *= alpha; scores += beta * |w·g|``, alpha = 0.9,
beta = 1.0) decays the previous score instead of summing: ``snip-momentum{alpha=0.9, beta=1.0}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.fx import Node

from chop.errors import DataError, OptionError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.kernels import distributed
from chop.passes.analysis.criterion import DataCriterion, reusable
from chop.passes.analysis.scoring import backward_sums, module_backward_sums
from chop.pipeline.pass_base import Context, option


@dataclass(frozen=True)
class SnipMomentum(DataCriterion):
    """SNIP with momentum for pruning during training: alpha·previous + beta·|w ⊙ g|."""

    name: ClassVar[str] = "snip-momentum"
    accumulates: ClassVar[bool] = True

    alpha: float = option(1.0, "weight of the previous score (INC's code: 0.9)")
    beta: float = option(0.9, "weight of this step's |w·g| (INC's code: 1.0)")
    source: Literal["data", "grad"] = option(
        "data", "gradient from `batches` of data, or the .grad left by the training loop"
    )

    def check(self) -> None:
        super().check()
        if self.alpha < 0 or self.beta <= 0:
            raise OptionError(
                f"snip-momentum: alpha={self.alpha}, beta={self.beta}; alpha must be >= 0 and "
                "beta > 0 (INC uses alpha=0.9, beta=1.0)"
            )
        if self.normalize:
            raise OptionError(
                "snip-momentum: normalize=true would rescale the running score at every step; "
                "leave it off (the mask ranking does not depend on the scale)"
            )

    def data_batches(self) -> int:
        return self.batches if self.source == "data" else 0

    def scores(self, graph: Graph, nodes: list[Node], ctx: Context) -> list[torch.Tensor]:
        if self.source == "data":
            current = backward_sums(graph, nodes, ctx.data, ctx.loss, self.name, bn=self.bn,
                                    over_ranks=self.data_parallel())
        else:
            weights = [graph.parameter(n) for n in nodes]
            current = _grad_terms(weights, [w.grad for w in weights],
                                  lambda: [n.target for n in nodes])
            self.sum_over_ranks(current)
            torch._foreach_abs_(current)
        return self._momentum(current, [meta.entries(n).get("saliency") for n in nodes])

    def module_scores(self, module: nn.Module, params: list[nn.Parameter], ctx: Context,
                      previous: list[torch.Tensor | None]) -> list[torch.Tensor]:
        if self.source == "data":
            current = module_backward_sums(module, params, ctx.data, ctx.loss, self.name,
                                           bn=self.bn)
        else:
            weights = [distributed.local(p) for p in params]
            grads = [distributed.local_grad(p) for p in params]
            current = _grad_terms(weights, grads, lambda: _names(module, params))
            torch._foreach_abs_(current)
        return self._momentum(current, previous, given_up=True)

    def _momentum(self, current: list[torch.Tensor], previous: list[torch.Tensor | None],
                  given_up: bool = False) -> list[torch.Tensor]:
        """alpha·previous + beta·current (beta·current where there is no previous score), with
        as few multi-tensor ops as the constants allow: an accumulating criterion runs at every
        training step, where each op's fixed cost shows. ``current`` holds this step's own fresh
        terms and may be overwritten; ``previous`` (the stored scores) is left as it was unless
        ``given_up`` (see :meth:`module_scores`)."""
        alpha, beta = self.alpha, self.beta
        if all(before is not None and before.dtype == now.dtype
               for now, before in zip(current, previous, strict=True)):  # every later step
            if beta == 1.0:  # INC's constants
                torch._foreach_add_(current, previous, alpha=alpha)
                return current
            if alpha == 1.0 and given_up and reusable(previous, current):  # the defaults
                torch._foreach_add_(previous, current, alpha=beta)
                return previous
            if alpha == 1.0:  # the defaults: one fused op, new tensors
                return torch._foreach_add(previous, current, alpha=beta)
            torch._foreach_mul_(current, beta)
            torch._foreach_add_(current, previous, alpha=alpha)
            return current
        if beta != 1.0:
            torch._foreach_mul_(current, beta)
        pairs = [(now, before.to(now.dtype)) for now, before in zip(current, previous, strict=True)
                 if before is not None]
        if pairs:
            torch._foreach_add_([now for now, _ in pairs], [before for _, before in pairs],
                                alpha=alpha)
        return current


def _grad_terms(weights: list[torch.Tensor], grads: list[torch.Tensor | None],
                names: Callable[[], list[str]]) -> list[torch.Tensor]:
    """w ⊙ g for each weight (0 where it has no gradient, with a warning naming those, once
    per set of ``names()``), refusing when none has one."""
    if all(g is not None for g in grads):  # each weight has one (a training step's usual case)
        return torch._foreach_mul([w.detach() for w in weights], grads)
    if all(g is None for g in grads):
        raise DataError(
            "snip-momentum{source=grad} found no .grad on the parameters: call "
            "loss.backward() before scoring, or use source=data with data=... batches"
        )
    present = [i for i, g in enumerate(grads) if g is not None]
    missing = tuple(name for name, g in zip(names(), grads, strict=True) if g is None)
    if missing and missing not in _WARNED:
        _WARNED.add(missing)
        log.warning("snip-momentum{source=grad}: %d weight(s) have no .grad (frozen, or unused "
                    "by the loss): %s. They score 0, so a global selection prunes them first "
                    "and can empty them; leave them out of the mask (exclude='regex') or score "
                    "from data (source=data)", len(missing), ", ".join(missing[:5])
                    + (f", … ({len(missing) - 5} more)" if len(missing) > 5 else ""))
    products = dict(zip(present, torch._foreach_mul([weights[i].detach() for i in present],
                                                    [grads[i] for i in present])))
    return [products[i] if i in products else torch.zeros_like(w.detach())
            for i, w in enumerate(weights)]


def _names(module: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """The names of ``params`` in ``module`` ("?" for one it does not hold)."""
    by_id = {id(p): name for name, p in module.named_parameters()}
    return [by_id.get(id(p), "?") for p in params]


_WARNED: set[tuple[str, ...]] = set()  # names already warned about (a Pruner scores each step)
log = logging.getLogger("chop")

snip_momentum_saliency = SnipMomentum.compute
