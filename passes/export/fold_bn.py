"""``fold-bn``: fold eval-mode BatchNorm into the conv or linear layer before it.

A BatchNorm with running statistics computes, in eval mode, ``(z − μ)·γ/σ + β`` per channel
(``σ = sqrt(running_var + eps)``). When ``z`` is the output of a conv (``aten.conv1d/2d/3d``,
``aten.convolution``, not transposed) or of an ``aten.linear`` with a 2-D output, and feeds
nothing but the BatchNorm, the pair is one layer with weight ``W·γ/σ`` (scaled per output
channel) and bias ``(b − μ)·γ/σ + β`` (``b = 0``, ``γ = 1``, ``β = 0`` where absent; a conv
without bias gets one). The BatchNorm node is removed with its parameters, running statistics
and ``num_batches_tracked`` counter. Both ``aten.batch_norm`` and
``aten._native_batch_norm_legit_no_training`` are folded. Each BatchNorm left alone is reported
with the reason: no running statistics, its input also feeds another op, or it does not come
from a conv/linear whose weight and bias are parameters of their own (shared weights are not
folded; nor are transposed convolutions), and a warning names the first few.

Masks still in the graph are folded first (as ``fold`` does): folding scales whole rows, so the
pruned entries of a weight stay zero and its ``mask`` metadata stays true; a pruned bias entry
becomes ``−μ·γ/σ + β``, so a folded bias loses its mask. The other analyses (saliency,
channel groups, collapse) describe the graph before folding and are dropped. The folded graph
computes what the graph computed in eval mode (checked on the first samples of the first batch, given data).

**After folding, the graph is an inference graph.** ``graph.train()`` still switches dropout,
but there is no BatchNorm left to use batch statistics: trained further, it is a network without
normalisation, not the original one. Fold as the last step before export, after training.
The state dict has new keys (the new biases) and lacks the BatchNorm's, so the pass declares
``reshapes``: load the graph's own state dict or its ``.pt2``, not the original model class.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from chop.ir import meta
from chop.ir.graph import Graph, node_arg, set_node_arg
from chop.ir.masks import add_tensor, is_masked
from chop.passes.export.common import checked_export
from chop.passes.export.fold import fold_masks
from chop.pipeline.pass_base import Context, Pass, PassResult

aten = torch.ops.aten
log = logging.getLogger("chop")
_BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_TRANSPOSED = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


def fold_batch_norms(graph: Graph) -> dict[str, dict[str, Any]]:
    """Fold every foldable BatchNorm of ``graph`` in place (see the module doc); returns a row
    per BatchNorm: ``{"into": weight name}`` when folded, ``{"reason": why not}`` otherwise."""
    if is_masked(graph):
        fold_masks(graph)
    rows: dict[str, dict[str, Any]] = {}
    for bn in list(graph.module.graph.nodes):
        if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
            continue
        stats = bn.args[3:5]
        name = stats[0].target.rpartition(".")[0] if isinstance(stats[0], Node) else bn.name
        if name in rows:  # one BatchNorm module called twice: a row per call
            name = f"{name} ({bn.name})"
        producer, reason = _foldable(graph, bn)
        if producer is None:
            rows[name] = {"reason": reason}
            continue
        op = str(producer.target.overloadpacket).removeprefix("aten.")
        rows[name] = {"into": producer.args[1].target, "op": op}
        _fold(graph, bn, producer)
    graph.recompile()
    return rows


def _parameter(graph: Graph, arg: Any, user: Node) -> bool:
    """``arg`` is None, or a parameter's get_attr node read by ``user`` only."""
    if arg is None:
        return True
    if not isinstance(arg, Node) or arg.op != "get_attr" or set(arg.users) != {user}:
        return False
    try:
        graph.module.get_parameter(arg.target)
    except AttributeError:
        return False
    return True


def _foldable(graph: Graph, bn: Node) -> tuple[Node | None, str]:
    """The conv/linear node ``bn`` folds into, or None and the reason it cannot."""
    x, gamma, beta, mean, var = bn.args[:5]
    if not (isinstance(mean, Node) and isinstance(var, Node)):
        return None, "no running statistics: it always normalises with batch statistics"
    if bn.target is aten._native_batch_norm_legit_no_training.default and any(
        u.target is not operator.getitem or u.args[1] != 0 for u in bn.users
    ):
        return None, "its batch statistics outputs are used"
    packet = getattr(x, "target", None) if isinstance(x, Node) else None
    if getattr(packet, "overloadpacket", None) in _TRANSPOSED:
        return None, f"{x.name} is a transposed convolution"
    if getattr(packet, "overloadpacket", None) not in (*_CONVS, aten.linear):
        return None, f"its input is not a conv or linear output ({getattr(x, 'name', x)})"
    if len(x.users) != 1:
        others = ", ".join(u.name for u in x.users if u is not bn)
        return None, f"the output of {x.name} also feeds {others}"
    if x.target.overloadpacket is aten.convolution and node_arg(x, 6, "transposed"):
        return None, f"{x.name} is a transposed convolution"
    if x.target.overloadpacket is aten.linear:
        value = x.meta.get("val")
        if value is None or value.dim() != 2:
            return None, (f"{x.name} does not have a 2-D output, so its features are not "
                          "BatchNorm's channels")
    weight, bias = x.args[1], node_arg(x, 2, "bias")
    if weight is None or not (_parameter(graph, weight, x) and _parameter(graph, bias, x)):
        return None, (f"the weight or bias of {x.name} is not a parameter of its own (shared or "
                      "computed)")
    if not all(p is None or (isinstance(p, Node) and p.op == "get_attr") for p in (gamma, beta)):
        return None, "its weight or bias is computed, not a parameter"
    return x, ""


def _value(graph: Graph, node: Node | None) -> torch.Tensor | None:
    """The float64 value of a get_attr node (a parameter or buffer), or None."""
    if node is None:
        return None
    return operator.attrgetter(node.target)(graph.module).detach().double()


def _fold(graph: Graph, bn: Node, producer: Node) -> None:
    _, gamma_node, beta_node, mean_node, var_node = bn.args[:5]
    eps = node_arg(bn, 7 if bn.target is aten.batch_norm.default else 6, "eps")
    weight_node, bias_node = producer.args[1], node_arg(producer, 2, "bias")
    weight = graph.parameter(weight_node.target)
    with torch.no_grad():
        scale = torch.rsqrt(_value(graph, var_node) + eps)
        if gamma_node is not None:
            scale = scale * _value(graph, gamma_node)
        bias = -_value(graph, mean_node) if bias_node is None else (
            _value(graph, bias_node) - _value(graph, mean_node))
        bias = bias * scale
        if beta_node is not None:
            bias = bias + _value(graph, beta_node)
        bias = bias.to(weight.dtype)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        graph.replace_parameter(weight_node.target,
                                (weight.detach().double() * scale.view(shape)).to(weight.dtype))
    g = graph.module.graph
    if bias_node is not None:
        graph.replace_parameter(bias_node.target, bias)
        meta.entries(bias_node).pop("mask", None)  # (b − μ)·γ/σ + β: nonzero where b was pruned
    else:
        target = add_tensor(graph, weight_node.target, "bias", torch.nn.Parameter(
            bias, requires_grad=weight.requires_grad), parameter=True)
        with g.inserting_before(producer):
            bias_node = g.get_attr(target)
        meta.entries(bias_node).update(role="bias", op=meta.entries(weight_node).get("op", "other"))
        set_node_arg(producer, 2, "bias", bias_node)
    outputs = list(bn.users) if bn.target is not aten.batch_norm.default else [bn]
    for out in outputs:
        out.replace_all_uses_with(producer)
        if out is not bn:
            g.erase_node(out)
    g.erase_node(bn)
    owner = mean_node.target.rpartition(".")[0]
    counter_name = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
    counter = next((n for n in g.find_nodes(op="get_attr") if n.target == counter_name), None)
    for user in list(counter.users if counter is not None else ()):
        if not user.users:  # the train-mode update num_batches_tracked += 1
            g.erase_node(user)
    for node in (gamma_node, beta_node, mean_node, var_node, counter):
        if node is not None and not node.users:
            g.erase_node(node)
            parent, _, attr = node.target.rpartition(".")
            delattr(graph.module.get_submodule(parent), attr)


@dataclass(frozen=True)
class FoldBn(Pass):
    """Fold eval-mode BatchNorm into the preceding conv/linear (an inference graph after)."""

    name: ClassVar[str] = "fold-bn"
    kind: ClassVar[Literal["export"]] = "export"
    preserves: ClassVar[tuple[str, ...]] = ("mask",)  # rows are scaled: pruned entries stay 0
    reshapes: ClassVar[bool] = True  # BatchNorm keys leave the state dict, biases join it

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        params = sum(p.numel() for p in graph.module.parameters())
        rows, info = checked_export(graph, ctx, lambda: fold_batch_norms(graph), False, "fold-bn")
        folded = sum("into" in r for r in rows.values())
        left = [f"{name} ({row['reason']})" for name, row in rows.items() if "reason" in row]
        if left:
            log.warning("fold-bn: %d of %d BatchNorm(s) not folded, they stay in the graph: %s",
                        len(left), len(rows), "; ".join(left[:3])
                        + (f"; … ({len(left) - 3} more in the pass's info)" if len(left) > 3
                           else ""))
        info.update(batch_norms=rows, folded=folded,
                    params=[params, sum(p.numel() for p in graph.module.parameters())])
        return PassResult(modified=folded > 0, info=info)
