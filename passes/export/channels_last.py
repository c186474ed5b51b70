"""``channels-last``: store conv weights channels-last, so CPU convolutions run in NHWC.

Every 4-D (5-D) weight read by a convolution is replaced by a copy in
``torch.channels_last`` (``channels_last_3d``) memory format; values, shapes and names are
unchanged, so the function and the state dict's contents are the same. oneDNN (mkldnn), torch's
CPU convolution, then computes in NHWC and keeps its outputs channels-last: the first conv
converts the input, BatchNorm, activations, pooling and residual adds follow the layout, and
no op converts back until a flatten or a linear.

Whether it pays depends on the machine and the batch: on this project's 2-core CPU it made a
shrunk ResNet-50 much faster at batch 16–32 and a little slower at batch 1
(``benchmarks/bench_shrink.py`` prints both). With ``timing`` and data, the model's latency
before and after is reported, so measure before shipping. The memory format survives
``torch.export.save``/``load`` and the passes that replace a conv weight after this one
(``fold``, ``fold-bn``, ``shrink``, and the mask folding of ``chop.save``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch.fx import GraphModule, Node

from chop.ir import meta
from chop.ir.graph import CHANNELS_LAST, Graph, strides_of
from chop.ir.masks import mask_of
from chop.passes.export.common import checked_export
from chop.pipeline.pass_base import Context, Pass, PassResult, option

aten = torch.ops.aten
log = logging.getLogger("chop")
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv2d.padding, aten.conv1d.padding, aten.conv3d.padding,
          aten.convolution.default, aten.conv_transpose1d.default,
          aten.conv_transpose2d.input, aten.conv_transpose3d.input)
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def to_channels_last(graph: Graph) -> list[str]:
    """Store every conv weight of ``graph`` that only convolutions read channels-last; returns
    the names converted (those already channels-last are left alone).

    A weight counts as channels-last when its strides are the ones ``torch.channels_last``
    gives its shape (:func:`~chop.ir.graph.strides_of`). A weight some other op reads too (a
    ``view`` of it, as a weight norm makes) stays as it is. The convolutions' results then come
    out channels-last, where a ``view`` cannot flatten them (a decomposed ``nn.Flatten``): each
    ``aten.view`` after a converted convolution (in a ``no_grad`` or ``autocast`` block too)
    becomes ``aten.reshape``, the same view wherever one exists, a copy where the layout has
    none (export graphs are functional, so no later in-place op can tell). Passes that replace
    such a weight later keep its layout (:meth:`~chop.ir.graph.Graph.replace_parameter`)."""
    converted, convs = [], []
    for node in graph.weight_nodes():
        weight = graph.parameter(node)
        layout = CHANNELS_LAST.get(weight.dim())
        readers = _readers(node)
        if (meta.entries(node).get("role") != "conv" or layout is None
                or not all(r.target in _CONVS for r in readers)):
            continue
        convs += readers
        if weight.stride() != strides_of(weight.shape, layout):
            graph.replace_parameter(node.target, weight.detach().clone(memory_format=layout))
            converted.append(node.target)
    changed = list(_reshaped(graph.module, _after(convs)))
    if changed:
        graph.recompile()
        for module in changed:
            if module is not graph.module:
                module.recompile()
    return converted


def _reshaped(owner: GraphModule, nodes: list[Node]) -> Iterator[GraphModule]:
    """Make each ``view`` among ``nodes`` (of ``owner``'s graph) a ``reshape``, and every view
    in the submodules of the higher-order ops among them (a ``no_grad`` or ``autocast``
    block); yields each module whose graph changed."""
    views = [n for n in nodes if n.target in _VIEWS]
    for view in views:
        view.target = aten.reshape.default
    if views:
        yield owner
    for node in nodes:
        for arg in node.args if isinstance(node.target, torch._ops.HigherOrderOperator) else ():
            sub = (getattr(owner, arg.target, None)
                   if isinstance(arg, Node) and arg.op == "get_attr" else None)
            if isinstance(sub, GraphModule):
                yield from _reshaped(sub, list(sub.graph.nodes))


def _readers(weight: Node) -> list[Node]:
    """The ops that read ``weight``, through its mask ``mul``."""
    return [r for u in weight.users for r in (u.users if mask_of(u) else [u])]


def _after(nodes: list[Node]) -> list[Node]:
    """Every node that reads the result of one of ``nodes``, directly or not, in graph order."""
    if not nodes:
        return []
    seen, todo = set(nodes), list(nodes)
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return [n for n in nodes[0].graph.nodes if n in seen and n not in nodes]


@dataclass(frozen=True)
class ChannelsLast(Pass):
    """Store conv weights channels-last (NHWC convolutions on CPU; pays at larger batches)."""

    name: ClassVar[str] = "channels-last"
    kind: ClassVar[Literal["export"]] = "export"

    timing: bool = option(False, "with data: report the model's latency before and after")

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        converted, info = checked_export(graph, ctx, lambda: to_channels_last(graph), self.timing,
                                         "channels-last")
        info["converted"] = converted
        convs = [n for n in graph.weight_nodes() if meta.entries(n).get("role") == "conv"]
        if not converted and not convs:
            log.warning("channels-last changed nothing: %s has no conv weight (it only changes "
                        "the layout of convolutions); leave it out of the pipeline", graph.name)
        elif not converted and all(graph.parameter(n).dim() not in CHANNELS_LAST for n in convs):
            log.warning("channels-last changed nothing: the convolutions of %s are 1-D, for which "
                        "torch has no channels-last layout; leave it out of the pipeline",
                        graph.name)
        return PassResult(modified=bool(converted), info=info)
