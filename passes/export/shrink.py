"""``shrink``: physically remove channels and heads that no longer matter, across coupled layers.

A channel group unit (see ``channel-groups``) is removed when every weight that reads it either
ignores it (its columns are all zero, e.g. masked) or sees a per-channel constant (its producers'
rows are all zero, so it is ``act(bn(bias))``) whose contribution folds exactly into that weight's
bias: always for linear/addmm, for a conv only without padding (a padded conv sees the constant
only away from the borders, so such channels stay). Removing means: smaller conv/linear/addmm
weights and biases, BatchNorm parameters and running statistics, depthwise ``groups``, view and
reshape sizes (head counts), split sizes and slice bounds; cat and attention follow by themselves.
Masks still in the graph are folded first (``fold``). At least one channel of every tensor is
kept. The result computes the same function as the masked graph in eval mode, and re-exports
with torch.export (a dynamic batch) as a ``.pt2``. Channels whose producers are zero are told
apart from channels whose readers are zero by the weights themselves (after folding), so a graph
pruned by any means (masks, zeroed weights) shrinks the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from chop.passes.analysis.channel_groups import ChannelGroups, channel_groups
from chop.passes.analysis.coupling import Consumer, Flow
from chop.passes.export.common import checked_export
from chop.passes.export.constants import channel_constants
from chop.passes.export.fold import fold_masks
from torch.fx import Node

from chop.errors import PassError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import add_tensor, is_masked, weight_name
from chop.pipeline.pass_base import Context, Pass, PassResult, option

log = logging.getLogger("chop")
aten = torch.ops.aten


class ShrinkError(PassError):
    """shrink met a layout it cannot rewrite exactly (a bug or an unsupported model)."""


def _slice_columns(weight: torch.Tensor, c: Consumer) -> torch.Tensor:
    """Whether each input position of consumer ``c`` is read by a nonzero weight."""
    nz = weight.detach() != 0
    if c.kind == "linear":
        return nz.any(0)
    if c.kind == "addmm":
        return nz.any(1)
    out_g = weight.shape[0] // c.groups
    rows = nz.flatten(2).any(2)  # [out, in_per_group]
    return torch.cat([rows[g * out_g:(g + 1) * out_g].any(0) for g in range(c.groups)])


def _delta(weight: torch.Tensor, c: Consumer, value: torch.Tensor, gone: torch.Tensor) -> torch.Tensor:
    """What the removed positions ``gone`` (constant ``value``) added to each output."""
    w = weight.detach().double()
    v = torch.where(gone, value.double(), torch.zeros((), dtype=torch.float64))
    if c.kind == "linear":
        return w @ v
    if c.kind == "addmm":
        return v @ w
    out_g, in_g = weight.shape[0] // c.groups, weight.shape[1]
    summed = w.flatten(2).sum(2)  # constant input: every output position sees the whole kernel
    return torch.cat([summed[g * out_g:(g + 1) * out_g] @ v[g * in_g:(g + 1) * in_g]
                      for g in range(c.groups)])


def _decide(graph: Graph, groups: ChannelGroups, compensate: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Removed flag per unit, unit id per atom, and the channel constants."""
    flow = groups.flow
    atom_unit = torch.full((flow.coupling.number_of_nodes(),), -1, dtype=torch.long)
    for atom, unit in groups.unit_of.items():
        atom_unit[atom] = unit
    removed = torch.zeros(max(groups.unit_of.values(), default=-1) + 1, dtype=torch.bool)
    for g in groups:
        removed[torch.tensor(g.units, dtype=torch.long)] = g.prunable
    consts = channel_constants(graph, flow)
    for c in flow.consumers:
        atoms = flow.tags[c.input].atoms
        read = _slice_columns(graph.module.get_parameter(c.weight), c)
        _, known = consts[c.input]
        foldable = known & (compensate and not (c.kind == "conv" and c.padded))
        removed[atom_unit[atoms[read & ~foldable]]] = False
    changed = True
    while changed:  # never empty a tensor: keep the first channel of any that would be
        changed = False
        for tag in flow.tags.values():
            units = atom_unit[tag.atoms.flatten()]
            if units.numel() and bool(removed[units].all()):
                removed[units[0]] = False
                changed = True
    return removed, atom_unit, consts


def _sizes(flow: Flow, node: Node, gone: torch.Tensor) -> list[int]:
    """New size of each channel dim of ``node``; checks the kept positions form a box."""
    keep = ~gone
    sizes, box = [], torch.ones((), dtype=torch.bool)
    for i in range(keep.dim()):
        kept_i = keep.movedim(i, 0).reshape(keep.shape[i], -1).any(1)
        sizes.append(int(kept_i.sum()))
        box = box.unsqueeze(-1) & kept_i if i else kept_i
    if not torch.equal(box, keep):
        raise ShrinkError(f"the channels kept at {node.name} do not form a box; this is a bug in "
                          "chop (please report it with the model)")
    return sizes


def _set_size_args(node: Node, dims: tuple[int, ...], sizes: list[int], start: int = 0) -> None:
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (aten.view, aten.reshape, aten._unsafe_view, aten.expand):
        shape = list(node.args[1])
        for d, s in zip(dims, sizes):
            if shape[d] != -1 or packet is not aten.expand:
                shape[d] = s
        node.update_arg(1, shape)
    elif packet is aten.unflatten:
        shape, first = list(node.args[2]), node.args[1] % node.args[0].meta["val"].dim()
        for d, s in zip(dims, sizes):
            if 0 <= d - first < len(shape):
                shape[d - first] = s
        node.update_arg(2, shape)


def _new_bias(graph: Graph, c: Consumer, delta: torch.Tensor) -> str:
    """Give consumer ``c`` a bias parameter (it had none) and return its name."""
    name = add_tensor(graph, c.weight, "bias", delta.clone(), parameter=True)
    with graph.module.graph.inserting_before(c.node):
        node = graph.module.graph.get_attr(name)
    node.meta["val"] = delta
    meta.entries(node).update(role="bias", op=str(c.node.target.overloadpacket).removeprefix("aten."))
    if len(c.node.args) > 2:
        c.node.update_arg(2, node)
    else:
        c.node.update_kwarg("bias", node)
    return name


def _layers(graph: Graph) -> dict[str, tuple[Node, int]]:
    """Each conv/linear/addmm by weight name, with its output positions per example (at the
    traced sizes): FLOPs are 2 · weight.numel() · positions."""
    batch = next((n.meta["val"].shape[0] for n in graph.module.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim()), 1)
    found = {}
    for node in graph.module.graph.nodes:
        packet = getattr(node.target, "overloadpacket", None)
        if packet not in (aten.linear, aten.addmm, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution):
            continue
        name = weight_name(graph, node.args[2] if packet is aten.addmm else node.args[1])
        out = node.meta.get("val")
        if name is None or not isinstance(out, torch.Tensor):
            continue
        channels = out.shape[-1] if packet in (aten.linear, aten.addmm) else out.shape[1]
        found[name] = (node, _hint(out.numel()) // max(_hint(batch), 1) // max(int(channels), 1))
    return found


def _stats(graph: Graph, layers: dict[str, tuple[Node, int]]) -> dict[str, dict[str, int]]:
    stats = {}
    for name, (node, positions) in layers.items():
        weight = graph.module.get_parameter(name)
        bias = weight_name(graph, _bias_arg(node))
        params = weight.numel() + (graph.module.get_parameter(bias).numel() if bias else 0)
        stats[name] = {"params": params, "flops": 2 * weight.numel() * positions}
    return stats


def _bias_arg(node: Node) -> Any:
    if node.target.overloadpacket is aten.addmm:
        return node.args[0]
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = size.node.hint
    return int(hint) if hint is not None else int(size.node.shape_env.size_hint(size.node.expr))


def _refresh_shapes(graph: Graph) -> None:
    """Recompute ``meta['val']`` of every node after the shapes changed (fake tensors)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = list(graph.module.graph.find_nodes(op="placeholder"))
    vals = [n.meta.get("val") for n in placeholders]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    try:
        FakeTensorProp(graph.module, mode).propagate_dont_convert_inputs(*vals)
    except Exception as e:  # stale shapes would mislead later analyses: drop them instead
        log.debug("shrink: could not refresh node shapes (%s); dropping them", e)
        for node in graph.module.graph.nodes:
            if node.op == "call_function":
                node.meta.pop("val", None)


def shrink(graph: Graph, *, compensate: bool = True) -> dict[str, Any]:
    """Remove every removable channel and head of ``graph`` in place; see the module doc.

    Returns a report: ``layers`` (per conv/linear/addmm weight: ``(before, after)`` parameters,
    weight and bias, and FLOPs, 2·MACs per example at the traced sizes), ``total`` (all
    parameters of the graph, and the FLOPs of those layers) and ``removed`` (channels or heads
    removed, per group id of ``channel_groups(graph)`` before shrinking).
    """
    if is_masked(graph):
        fold_masks(graph)
    layers_at = _layers(graph)
    before = _stats(graph, layers_at)
    total_before = sum(p.numel() for p in graph.module.parameters())
    groups = channel_groups(graph)
    flow = groups.flow
    removed, atom_unit, consts = _decide(graph, groups, compensate)
    gone = {node: removed[atom_unit[tag.atoms]] for node, tag in flow.tags.items()}

    with torch.no_grad():
        new_biases: dict[str, Consumer] = {}
        for c in flow.consumers:
            cut = gone[c.input]
            if not cut.any():
                continue
            weight = graph.module.get_parameter(c.weight)
            delta = _delta(weight, c, consts[c.input][0], cut & _slice_columns(weight, c))
            if not delta.any():
                continue
            bias = weight_name(graph, _bias_arg(c.node))
            if bias is None:
                new_biases[_new_bias(graph, c, delta.to(weight.dtype))] = c
            else:
                old = graph.module.get_parameter(bias)
                graph.replace_parameter(bias, (old.detach().double() + delta).to(old.dtype))

        nodes = {n.target: n for n in graph.weight_nodes()}
        records = list(flow.members.values())
        for name, c in new_biases.items():  # a new bias is cut like its weight's rows
            rows = flow.members.get((c.weight, 1 if c.kind == "addmm" else 0))
            if rows is not None:
                records.append(type(rows)(name, 0, "parameter", "out", rows.atoms))
        for record in records:
            known = record.atoms >= 0
            drop = torch.zeros_like(known)
            drop[known] = removed[atom_unit[record.atoms[known]]]
            if not drop.any():
                continue
            index = (~drop).nonzero().flatten()
            owner_name, _, attr = record.name.rpartition(".")
            owner = graph.module.get_submodule(owner_name)
            if record.kind == "parameter":
                smaller = getattr(owner, attr).detach().index_select(record.dim, index)
                graph.replace_parameter(record.name, smaller)
                entry = meta.entries(nodes[record.name]) if record.name in nodes else {}
                for key in ("mask", "saliency"):
                    if isinstance(entry.get(key), torch.Tensor):
                        entry[key] = entry[key].index_select(record.dim, index)
            else:
                owner._buffers[attr] = owner._buffers[attr].index_select(record.dim, index)

    for node, step in list(flow.steps.items()):
        if node in flow.tags:
            cut = gone[node]
            if cut.any():
                _set_size_args(node, flow.tags[node].dims, _sizes(flow, node, cut))
        if step.kind == "depthwise" and gone[step.inputs[0]].any():
            index = 8 if node.target.overloadpacket is aten.convolution else 6
            node.update_arg(index, int((~gone[step.inputs[0]]).sum()))
        if step.kind == "split":
            parts = [user for user in node.users]
            sizes = list(step.info["sizes"])
            for user in parts:
                sizes[user.args[1]] = int((~gone[user]).sum()) if user in gone else sizes[user.args[1]]
            node.target = aten.split_with_sizes.default
            node.args = (node.args[0], sizes, step.info["dim"])
        if node in flow.tags and "range" in step.info and node.target is aten.slice.Tensor:
            lo, hi = step.info["range"]
            kept = ~gone[step.inputs[0]]
            node.args = (node.args[0], node.args[1], int(kept[:lo].sum()), int(kept[:hi].sum()))
            node.kwargs = {}
    graph.recompile()
    _refresh_shapes(graph)

    after = _stats(graph, layers_at)
    layers = {name: {"params": (b["params"], after.get(name, {}).get("params", 0)),
                     "flops": (b["flops"], after.get(name, {}).get("flops", 0))}
              for name, b in before.items()}
    removed_per_group = {g.id: int(removed[torch.tensor(g.units)].sum()) for g in groups
                         if bool(removed[torch.tensor(g.units)].any())}
    return {
        "layers": layers,
        "total": {"params": (total_before, sum(p.numel() for p in graph.module.parameters())),
                  "flops": (sum(v["flops"][0] for v in layers.values()),
                            sum(v["flops"][1] for v in layers.values()))},
        "removed": removed_per_group,
    }


@dataclass(frozen=True)
class Shrink(Pass):
    """Physically remove channels and heads that no weight reads any more (masked graph in,
    smaller equivalent graph out)."""

    name: ClassVar[str] = "shrink"
    kind: ClassVar[Literal["export"]] = "export"
    preserves: ClassVar[tuple[str, ...]] = ("saliency", "mask")  # sliced with their weights
    reshapes: ClassVar[bool] = True

    compensate: bool = option(
        True, "fold the constant output of a removed channel into the next layer's bias "
              "(where exact); off: keep such channels")
    timing: bool = option(False, "with data: measure the model's latency before and after")

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        report, timed = checked_export(
            graph, ctx, lambda: shrink(graph, compensate=self.compensate), self.timing, "shrunk"
        )
        report["total"].update(timed)
        params = report["total"]["params"]
        return PassResult(modified=params[1] != params[0], info=report)
