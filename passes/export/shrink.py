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
pruned by any means (masks, zeroed weights) shrinks the same way. The channel walk and groups of
``mask{granularity=channel}`` are reused when still current; node shapes (``meta["val"]``) are
updated from the cut sizes (:mod:`chop.passes.export.shapes`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.fx import Node

from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import add_tensor, is_masked, mask_nodes, mask_of, weight_name
from chop.passes.analysis.channel_groups import (
    KEY,
    ChannelGroups,
    channel_groups,
    current_channel_groups,
    current_flow,
)
from chop.passes.analysis.flow import Flow, MemberRecord, rule_for, trace_channels
from chop.passes.analysis.flow.rule import Const, Consumer, Cut
from chop.passes.analysis.flow.rules.producers import Producer
from chop.passes.export.common import checked_export
from chop.passes.export.constants import channel_constants
from chop.passes.export.fold import fold_masks
from chop.passes.export.shapes import positions_per_example, refresh_shapes
from chop.pipeline.pass_base import Context, Pass, PassResult, option

Layers = dict[str, tuple[Node, Producer, int]]


def shrink(graph: Graph, *, compensate: bool = True) -> dict[str, Any]:
    """Remove every removable channel and head of ``graph`` in place; see the module doc.

    Returns a report: ``layers`` (per conv/linear/addmm weight: ``(before, after)`` parameters,
    weight and bias, and FLOPs, 2·MACs per example at the traced sizes), ``total`` (all
    parameters of the graph, and the FLOPs of those layers) and ``removed`` (channels or heads
    removed, per group id of ``channel_groups(graph)`` before shrinking).
    """
    if is_masked(graph):  # masked entries become zero weights: the weights alone tell what goes
        fold_masks(graph, recompile=False)
    try:
        return _shrink(graph, compensate)
    finally:
        graph.recompile()  # once, for the fold and the cut (and after an error, for the fold)


def _shrink(graph: Graph, compensate: bool) -> dict[str, Any]:
    layers = _layers(graph)
    before = (_stats(graph, layers), _total(graph))
    reused = current_flow(graph)  # mask's walk and groups, if this graph still is what it walked
    if reused is not None:
        flow, groups = reused
    else:
        flow = trace_channels(graph)
        groups = current_channel_groups(graph, flow) or channel_groups(graph, flow)
    consts = channel_constants(graph, flow)
    reads = [c.rule.reads(c, graph.parameter(c.weight)) for c in flow.consumers]
    removed = _decide(flow, groups, consts, reads, compensate)  # per unit
    cut = Cut(flow.tags, removed[groups.unit_of])  # per atom
    with torch.no_grad():
        new_biases = _carry_constants(graph, flow, cut, consts, reads)
        _cut_tensors(graph, flow, cut, new_biases)
    before_edit = {n: (n.target, n.args, n.kwargs) for n in graph.module.graph.nodes
                   if n.op == "call_function"}
    sizes = _rewrite_nodes(flow, cut)
    edited = {n for n, was in before_edit.items() if was != (n.target, n.args, n.kwargs)}
    graph.module.meta.get("chop", {}).pop(KEY, None)  # the groups and walk of the graph before
    refresh_shapes(graph, flow.tags, sizes, edited)
    return _report(graph, layers, before, groups, removed)


def _decide(flow: Flow, groups: ChannelGroups, consts: dict[Node, Const],
            reads: list[torch.Tensor], compensate: bool) -> torch.Tensor:
    """Which units go (bool per unit): the prunable ones no weight reads (``reads``: per
    consumer, whether its weight reads each input position), or whose constant every nonzero
    reader can absorb exactly; never every channel of a tensor."""
    units = int(groups.unit_of.max()) + 1 if groups.unit_of.numel() else 0
    removed = torch.zeros(units, dtype=torch.bool)
    if len(groups):  # a unit is in one group at most
        removed[_units(groups)[0]] = torch.cat([g.prunable for g in groups])
    sites = Counter(c.weight for c in flow.consumers)
    for c, read in zip(flow.consumers, reads):
        atoms = flow.tags[c.input].atoms
        # a weight applied at several sites has one bias for all: a constant channel whose value
        # differs between them cannot be folded into it (so none is)
        folds = compensate and c.folds and sites[c.weight] == 1
        foldable = consts[c.input][1] & folds
        removed[groups.unit_of[atoms[read & ~foldable]]] = False
    # keep the first channel of any tensor that would be emptied, tensor after tensor in graph
    # order (keeping one never empties another, so one pass does it); each step finds the next
    # emptied tensor over all of them at once
    tags = [t.atoms.flatten() for t in flow.tags.values() if t.atoms.numel()]
    if not tags:
        return removed
    sizes = torch.tensor([len(t) for t in tags], dtype=torch.long)
    unit = groups.unit_of[torch.cat(tags)]
    which = torch.repeat_interleave(torch.arange(len(tags)), sizes)
    first = unit[sizes.cumsum(0) - sizes]
    start = 0
    while True:
        kept = torch.zeros(len(tags), dtype=torch.long).index_add_(
            0, which, (~removed[unit]).long())
        emptied = (kept[start:] == 0).nonzero().flatten()
        if not emptied.numel():
            return removed
        start += int(emptied[0])
        removed[first[start]] = False
        start += 1


def _units(groups: ChannelGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's units, concatenated, and the position in ``groups`` of each one's group."""
    sizes = torch.tensor([g.size for g in groups], dtype=torch.long)
    units = torch.tensor([u for g in groups for u in g.units], dtype=torch.long)
    return units, torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def _carry_constants(graph: Graph, flow: Flow, cut: Cut, consts: dict[Node, Const],
                     reads: list[torch.Tensor]) -> dict[str, Consumer]:
    """Add what the removed constant channels gave each reader to the reader's bias (creating
    one where it had none); returns the biases created, by name."""
    created = {}
    for c, read in zip(flow.consumers, reads):
        gone = cut.gone(c.input) & read
        value = consts[c.input][0]
        if not bool((gone & (value != 0)).any()):  # nothing to carry
            continue
        weight = graph.parameter(c.weight)
        delta = c.rule.delta(c, weight, value, gone)
        if not delta.any():
            continue
        bias = weight_name(graph, c.rule.operands(c.node)[2])
        if bias is None:
            created[_new_bias(graph, c, delta.to(weight.dtype))] = c
        else:
            old = graph.parameter(bias)
            graph.replace_parameter(bias, (old.detach().double() + delta).to(old.dtype))
    return created


def _new_bias(graph: Graph, c: Consumer, delta: torch.Tensor) -> str:
    """Give consumer ``c`` a bias parameter (it had none) and return its name."""
    name = add_tensor(graph, c.weight, "bias", delta.clone(), parameter=True)
    with graph.module.graph.inserting_before(c.node):
        node = graph.module.graph.get_attr(name)
    node.meta["val"] = delta
    meta.entries(node).update(role="bias", op=str(c.node.target.overloadpacket).removeprefix("aten."))
    c.rule.set_bias(c.node, node)
    return name


def _cut_tensors(graph: Graph, flow: Flow, cut: Cut, created: dict[str, Consumer]) -> None:
    """Slice every member parameter and buffer (and a weight's saliency and mask entries) to the
    kept indices; a created bias is cut like its weight's rows."""
    nodes = {n.target: n for n in graph.weight_nodes()}
    records = list(flow.members.values())
    for name, c in created.items():
        rows = flow.members.get((c.weight, c.rule.out_dim))
        if rows is not None:
            records.append(MemberRecord(name, 0, "parameter", "out", rows.atoms))
    if not records:
        return
    # the kept indices of every record at once (hundreds of records, a few ops each otherwise):
    # an index without an atom (-1) reads the False appended to ``removed``
    lengths = torch.tensor([len(r.atoms) for r in records])
    drop = torch.cat([cut.removed, cut.removed.new_zeros(1)])[torch.cat([r.atoms for r in records])]
    which = torch.repeat_interleave(torch.arange(len(records)), lengths)
    index = torch.arange(len(drop)) - (lengths.cumsum(0) - lengths)[which]
    dropped = torch.zeros(len(records), dtype=torch.long).index_add_(0, which, drop.long())
    kept_counts = (lengths - dropped).tolist()
    pieces = torch.split(index[~drop], kept_counts)
    kept: dict[str, list[tuple[int, torch.Tensor]]] = {}  # per tensor: (dim, kept indices)
    kinds = {}
    for record, n, piece in zip(records, dropped.tolist(), pieces):
        if n:
            kept.setdefault(record.name, []).append((record.dim, piece))
            kinds[record.name] = record.kind
    for name, dims in kept.items():
        dims.sort(key=lambda d: d[0])  # rows first: a gather of rows is cheap, of columns not

        def take(t: torch.Tensor) -> torch.Tensor:
            for dim, index in dims:
                t = t.index_select(dim, index)
            return t

        if kinds[name] == "parameter":
            graph.replace_parameter(name, take(graph.parameter(name).detach()))
            entry = meta.entries(nodes[name]) if name in nodes else {}
            for key in ("mask", "saliency"):
                if isinstance(entry.get(key), torch.Tensor):
                    entry[key] = take(entry[key])
        else:
            module, attr = graph.owner(name)
            module._buffers[attr] = take(module._buffers[attr])


def _rewrite_nodes(flow: Flow, cut: Cut) -> dict[Node, dict[int, int]]:
    """Each rule edits the sizes its node spells out (view shapes, split sizes, slice bounds,
    depthwise groups); returns the new sizes of the channel dims of every node that lost
    channels."""
    sizes = {}
    for node in flow.tags:
        if cut.any(node):
            sizes[node] = cut.sizes(node)  # checks that the kept positions form a box
    for node, step in list(flow.steps.items()):
        step.rule.rewrite(node, step, cut)
    return sizes


# -- the report ------------------------------------------------------------------------------


def _layers(graph: Graph) -> Layers:
    """Each conv/linear/addmm by weight name, with its rule and its output positions per
    example (:func:`~chop.passes.export.shapes.positions_per_example`)."""
    found = {}
    for node in graph.module.graph.nodes:
        rule = rule_for(node) if node.op == "call_function" else None
        if not isinstance(rule, Producer):
            continue
        name, out = weight_name(graph, rule.operands(node)[1]), node.meta.get("val")
        if name is None or not isinstance(out, torch.Tensor):
            continue
        found[name] = (node, rule, positions_per_example(graph, out, rule.channel_dim(out.dim())))
    return found


def _stats(graph: Graph, layers: Layers) -> dict[str, dict[str, int]]:
    stats = {}
    for name, (node, rule, positions) in layers.items():
        weight = graph.parameter(name)
        bias = weight_name(graph, rule.operands(node)[2])
        params = weight.numel() + (graph.parameter(bias).numel() if bias else 0)
        stats[name] = {"params": params, "flops": 2 * weight.numel() * positions}
    return stats


def _total(graph: Graph) -> int:
    return sum(p.numel() for p in graph.module.parameters())


def _report(graph: Graph, layers: Layers, before: tuple[dict, int], groups: ChannelGroups,
            removed: torch.Tensor) -> dict[str, Any]:
    after = _stats(graph, layers)
    per_layer = {name: {"params": (b["params"], after.get(name, {}).get("params", 0)),
                        "flops": (b["flops"], after.get(name, {}).get("flops", 0))}
                 for name, b in before[0].items()}
    units, position = _units(groups)
    counts = torch.zeros(len(groups), dtype=torch.long).index_add_(
        0, position, removed[units].long())
    per_group = dict(zip((g.id for g in groups), counts.tolist()))
    return {
        "layers": per_layer,
        "total": {"params": (before[1], _total(graph)),
                  "flops": (sum(v["flops"][0] for v in per_layer.values()),
                            sum(v["flops"][1] for v in per_layer.values()))},
        "removed": {gid: n for gid, n in per_group.items() if n},
    }


def _fold_first(graph: Graph) -> bool:
    """Whether to fold the masks before the export check, so that its reference forward
    multiplies no masks: when most masked weight entries are linear ones, and so many that
    their products cost more than the extra recompile of the module.

    A linear weight is read once per token, a conv's once per output position: at the size of
    the check (two samples, a few tokens) a linear weight's mask product costs as much as its
    layer, a conv's little. Measured here (``mask`` then its products, 2 threads): a mask
    product 0.7–1.2 ns per entry on CNNs and 3–3.7 ns on BERT-base's linear weights, a
    recompile 35–75 µs per graph node, so folding pays from about ``_FOLD_ENTRIES`` linear
    entries per node (BERT-base: 98K; MobileNetV3-small's classifier: 3K, where folding cost
    a 35 ms recompile to save 3 ms of products)."""
    sizes = {"linear": 0, "conv": 0}
    for node in mask_nodes(graph):
        entries = meta.entries(graph.weight_node(mask_of(node)))
        if entries.get("role") in sizes:
            sizes[entries["role"]] += node.meta["val"].numel() if "val" in node.meta else 0
    return sizes["linear"] > max(sizes["conv"], _FOLD_ENTRIES * len(graph.module.graph.nodes))


_FOLD_ENTRIES = 20_000  # masked linear entries per graph node from which folding first pays


@dataclass(frozen=True)
class Shrink(Pass):
    """Physically remove channels and heads that no weight reads any more (masked graph in,
    smaller equivalent graph out)."""

    name: ClassVar[str] = "shrink"
    kind: ClassVar[Literal["export"]] = "export"
    preserves: ClassVar[tuple[str, ...]] = ("saliency", "mask")  # sliced with their weights
    reshapes: ClassVar[bool] = True
    acts_on_masks: ClassVar[bool] = True

    compensate: bool = option(
        True, "fold the constant output of a removed channel into the next layer's bias "
              "(where exact); off: keep such channels")
    timing: bool = option(False, "with data: measure the model's latency before and after")

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        if ctx.data is not None and _fold_first(graph):
            fold_masks(graph)  # then the check's reference forward multiplies no masks
        report, timed = checked_export(
            graph, ctx, lambda: shrink(graph, compensate=self.compensate), self.timing, "shrunk"
        )
        report["total"].update(timed)
        params = report["total"]["params"]
        return PassResult(modified=params[1] != params[0], info=report)
