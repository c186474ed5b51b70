"""``sparse``: store masked linear weights in CSR form, computed by a measured sparse kernel.

Each masked weight whose users are all linear-like (``aten.linear(x, W, b)``, GPT-2's
``aten.addmm(b, x, W)`` / ``aten.mm(x, W)`` with ``W`` of shape ``(in, out)``) is either

- **csr**: its kept entries (exactly ``mask.sum()`` of them) become three buffers on the weight's
  module — ``<attr>_values``, ``<attr>_col_indices``, ``<attr>_crow_indices`` — and every user
  becomes one ``chop.csr_linear(x, values, col_indices, crow_indices, out, bias, kernels,
  from_rows, transposed, in)`` call (see :mod:`chop.kernels.csr`). The dense parameter and
  the mask are removed, so ``state_dict`` holds the non-zeros only;
- **semi-structured** (CUDA only): a 2:4 mask along the input dim becomes a
  ``torch.sparse.to_sparse_semi_structured`` parameter read by ``aten.linear``;
- **dense**: kept dense, its mask folded (as ``fold`` does), with the reason recorded.

Which one (``mode``): ``auto`` chooses CSR when a layer keeps no more weights than a mask at
``min_sparsity`` keeps (:func:`~chop.kernels.select.kept_count`: a layer masked at exactly
``min_sparsity`` qualifies, whatever the rounding) and has at least ``min_numel`` weights (a
model of CPU latency: a CSR kernel costs a few dense multiply-adds per stored weight plus ~10–20
µs per call, so small layers never win; on a 4096×4096 layer ``bench_sparse.py`` measured CSR
against dense at 1 and 32 rows: 1.4× and 0.9× at 50% sparsity, 2.1× and 1.8× at 70%).
``measure`` times the dense and the CSR layer at batch ``timing_batch`` and keeps the faster.
``all`` converts every layer it can (for tests).
Conv weights stay dense (no sparse conv kernel yet; reported as such).

Which CSR kernel (``kernel``): ``measure`` (the default) times torch's three CSR forms, scipy's
loop and the weight written out dense for the call on each converted layer at 1, 4, 16, 64 and
256 input rows (:func:`~chop.kernels.csr.plan_kernels`) and stores the winners per row band as
the op's plan (past 256 rows, where the timings' lines cross);
the measurement happens here, on the machine that runs the pass, so run it where the model will
serve. A layer of the shape and dtype of one measured before, holding as many entries to
within 10% (``_SHARE_NNZ``), takes that layer's plan (``shared_with`` in its row), and with
``mode=measure`` (without ``timing``) its verdict, dense or CSR (``measured_on``): the layers
of a transformer's blocks are measured once per kind, not once each (0.1–8 s a layer), and
layers alike are decided alike rather than by the noise of their own timings.
A kernel name uses that kernel for every batch size (no timing).

Layout: a ``csr_linear`` whose result is read only by other ``csr_linear`` layers, directly or
through elementwise ops (activations; sums, products and powers of such results with each other
or with numbers, as in a gated MLP or a tanh GELU), returns it transposed (``transposed=True``,
see :mod:`chop.kernels.csr`): no transposing copy between sparse layers. A result that leaves the graph, or meets any other op (a residual add
with a row-major tensor, a view), keeps the row-major layout of the layer it replaces.

``PassResult.info`` has a row per masked weight (decision, reason, parameters and FLOPs per
example before/after, counted as ``shrink`` counts them, the kernel plan and its timings, latency
if ``timing``) and totals. With data,
the first samples of the first batch are run before and after in eval mode and the outputs must agree (fp32 allclose),
as for every chop export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from chop.errors import OptionError, PassError
from chop.ir import meta
from chop.ir.graph import Graph
from chop.ir.masks import add_tensor, is_masked, mask_nodes, mask_of
from chop.kernels.csr import (
    KERNELS,
    csr_linear,
    describe_plan,
    empty_result,
    plan_kernels,
    require_scipy,
    semi_structured,
    to_csr,
)
from chop.kernels.select import kept_count
from chop.kernels.timing import interleaved_seconds, median_seconds
from chop.passes.export.common import checked_export
from chop.passes.export.fold import fold_masks
from chop.passes.export.shapes import positions_per_example
from chop.pipeline.pass_base import Context, Pass, PassResult, option

aten = torch.ops.aten
SPARSE = "sparse"  # meta["chop"] entry on a csr_linear node: {"weight", "format", "shape", "nnz"}


def _linear_use(user: Node, mul: Node) -> tuple[Node, Node | None, bool] | None:
    """``(x, bias, transposed)`` when ``user`` is a linear-like use of ``mul`` we can replace;
    ``transposed`` means the weight is stored ``(in, out)`` (addmm/mm)."""
    args = user.args
    if user.target is aten.linear.default and len(args) >= 2 and args[1] is mul and args[0] is not mul:
        bias = args[2] if len(args) > 2 else user.kwargs.get("bias")
        return (args[0], bias, False) if bias is not mul else None
    if (user.target is aten.addmm.default and len(args) == 3 and args[2] is mul
            and not user.kwargs and mul not in args[:2]):
        bias = args[0]
        val = bias.meta.get("val") if isinstance(bias, Node) else None
        return (args[1], bias, True) if val is not None and val.dim() == 1 else None
    if user.target is aten.mm.default and args[1] is mul and args[0] is not mul:
        return args[0], None, True
    return None


# Elementwise ops whose result has the strides their inputs share (torch's elementwise rule):
# unary ones with any extra arguments scalars, and binary ones on two tensors of one shape.
def _ops(overloads: tuple[str, ...], *names: str) -> frozenset:
    return frozenset(getattr(packet, overload)
                     for name in names
                     for packet in (getattr(aten, name), getattr(aten, f"{name}_", None))
                     if packet is not None
                     for overload in overloads if hasattr(packet, overload))


UNARY = _ops(("default",), "tanh", "relu", "gelu", "sigmoid", "silu", "hardtanh", "leaky_relu",
             "elu", "hardswish", "hardsigmoid", "mish", "softplus", "clamp", "dropout")
BINARY = _ops(("Tensor", "Scalar", "Tensor_Tensor", "Tensor_Scalar"), "add", "sub", "mul", "div",
              "pow")


def _elementwise_inputs(node: Node) -> list[Node] | None:
    """The tensor inputs of ``node`` when it is an elementwise op that keeps their common
    layout (:data:`UNARY`, or :data:`BINARY` on nodes of its own shape, or on one node and a
    number); else None."""
    count = 1 if node.target in UNARY else 2 if node.target in BINARY else 0
    operands, rest = node.args[:count], (*node.args[count:], *node.kwargs.values())
    if not count or len(operands) < count or any(isinstance(a, Node) for a in rest):
        return None
    inputs = [a for a in operands if isinstance(a, Node)]
    if not inputs or any(not isinstance(a, (Node, int, float, bool)) for a in operands):
        return None
    shapes = [getattr(n.meta.get("val"), "shape", None) for n in (node, *inputs)]
    if None in shapes:
        return None
    return inputs if len({tuple(map(str, shape)) for shape in shapes}) == 1 else None  # symbols


def _transpose_results(graph: Graph) -> int:
    """Find the nodes whose results may be transposed: ``csr_linear`` layers and the
    elementwise ops between them, every one read only by other ``csr_linear`` layers (as
    their input) or by elementwise ops of the set, and every elementwise op of the set fed only
    by the set (the largest such set: start from every candidate, drop what breaks a rule until
    nothing does). Set ``transposed=True`` on its layers and the matching strides on the fake
    values of all; returns how many layers."""
    nodes = graph.module.graph.nodes
    inputs = {n: _elementwise_inputs(n) for n in nodes if n.op == "call_function"}
    chosen = {n for n in nodes if n.target is csr_linear or inputs.get(n) is not None}

    def keeps(n: Node) -> bool:
        fed = n.target is csr_linear or all(i in chosen for i in inputs[n])
        return fed and bool(n.users) and all(
            (u.target is csr_linear and u.args[0] is n and n not in u.args[1:]
             and n not in u.kwargs.values()) or (u in chosen and n in inputs[u])
            for u in n.users)

    changed = True
    while changed:
        dropped = {n for n in chosen if not keeps(n)}
        chosen -= dropped
        changed = bool(dropped)
    layers = 0
    for node in chosen:
        if node.target is csr_linear:
            node.args = (*node.args[:8], True, *node.args[9:])
            layers += 1
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):  # a result shaped like val: its leading dims are x's
            node.meta["val"] = empty_result(val, val.shape[-1], True)
    return layers


def _positions(graph: Graph, users: Any, conv: bool) -> int:
    """How many times per example the ops in ``users`` apply a weight, summed over them (a
    weight read twice costs twice): output pixels of a conv, tokens of a linear layer."""
    outs = [u.meta.get("val") for u in users]
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.dim()]
    return sum(positions_per_example(graph, o, 1 if conv else o.dim() - 1) for o in outs) or 1


def _time_layer(weight: torch.Tensor, csr: tuple, plan: tuple[list[int], list[int]],
                batch: int) -> tuple[float, float]:
    """Seconds per call of the dense and the CSR layer (with its kernel plan) for one ``(out,
    in)`` weight, timed interleaved."""
    x = torch.randn(batch, weight.shape[1], dtype=weight.dtype)
    times = interleaved_seconds({
        "dense": lambda: F.linear(x, weight),
        "csr": lambda: csr_linear(x, *csr, weight.shape[0], None, *plan, False, weight.shape[1]),
    })
    return times["dense"], times["csr"]


def _kind(kinds: dict[tuple, list[tuple[str, int]]], name: str, shape: tuple[int, int],
          dtype: torch.dtype, entries: int) -> str:
    """The first layer of ``name``'s kind converted so far: of its shape and dtype, holding as
    many stored entries to within ``_SHARE_NNZ``. ``name`` itself when it is the first of its
    kind, which ``kinds`` (by shape and dtype: ``[(name, entries), ...]``) then records."""
    same = kinds.setdefault((shape, dtype), [])
    for other, kept in same:
        if abs(entries - kept) <= _SHARE_NNZ * kept:
            return other
    same.append((name, entries))
    return name


def _plan(csr: tuple, shape: tuple[int, int], kernel: str, row: dict[str, Any], name: str,
          like: str, plans: dict[str, tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    """The layer ``name``'s kernel plan: the one named, or (``kernel="measure"``) that of the
    layer ``like`` (its kind, see :func:`_kind`) from ``plans``, else measured and added there;
    recorded in ``row["kernels"]`` with the timings in µs per input row count, or with the name
    of the layer it shares."""
    if kernel != "measure":
        plan: tuple[list[int], list[int]] = ([KERNELS.index(kernel)], [])
        row["kernels"] = {"plan": describe_plan(*plan)}
        return plan
    if like in plans:
        row["kernels"] = {"plan": describe_plan(*plans[like]), "shared_with": like}
        return plans[like]
    kernels, from_rows, seconds = plan_kernels(*csr, shape)
    row["kernels"] = {
        "plan": describe_plan(kernels, from_rows),
        "us": {rows: {k: t * 1e6 for k, t in times.items()} for rows, times in seconds.items()},
    }
    plans[name] = kernels, from_rows
    return kernels, from_rows


_SHARE_NNZ = 0.1  # relative difference in stored entries within which layers share a plan


def _replace_with_csr(
    graph: Graph, mul: Node, name: str, csr: tuple, shape: tuple[int, int], uses: list,
    plan: tuple[list[int], list[int]],
) -> None:
    attr = name.rpartition(".")[2]
    g = graph.module.graph
    getters = []
    for suffix, tensor in zip(("values", "col_indices", "crow_indices"), csr):
        buffer = add_tensor(graph, name, f"{attr}_{suffix}", tensor)
        with g.inserting_before(mul):
            getters.append(g.get_attr(buffer))
    out_features = shape[0]
    transposed = uses[0][1][2]  # the parameter is (in, out); the CSR arrays are (out, in)
    for user, (x, bias, _) in uses:
        with g.inserting_before(user):
            node = g.call_function(csr_linear, (x, *getters, out_features, bias, *plan, False,
                                                shape[1]))
        kept_meta = ("val", "stack_trace", "nn_module_stack")
        node.meta.update({k: v for k, v in user.meta.items() if k in kept_meta})
        meta.entries(node)[SPARSE] = {
            "weight": name, "format": "csr", "shape": shape, "nnz": csr[0].numel(),
            "plan": describe_plan(*plan), "transposed": transposed,
        }
        user.replace_all_uses_with(node)
        g.erase_node(user)
    _erase_masked_weight(graph, mul)


def _replace_with_semi_structured(graph: Graph, mul: Node, name: str, tensor: torch.Tensor,
                                  uses: list) -> None:
    new = add_tensor(graph, name, name.rpartition(".")[2] + "_semi_structured",
                     nn.Parameter(tensor, requires_grad=False), parameter=True)
    g = graph.module.graph
    with g.inserting_before(mul):
        getter = g.get_attr(new)
    for user, (x, bias, _) in uses:
        with g.inserting_before(user):
            node = g.call_function(aten.linear.default, (x, getter, bias))
        node.meta.update({k: v for k, v in user.meta.items() if k == "val"})
        meta.entries(node)[SPARSE] = {"weight": name, "format": "semi-structured"}
        user.replace_all_uses_with(node)
        g.erase_node(user)
    _erase_masked_weight(graph, mul)


def _erase_masked_weight(graph: Graph, mul: Node) -> None:
    """Remove ``mul(weight, mask)``, the mask buffer, and the dense parameter if now unused."""
    g = graph.module.graph
    weight_node, mask_node = mul.args
    g.erase_node(mul)
    if not mask_node.users:
        g.erase_node(mask_node)
        owner, _, attr = mask_node.target.rpartition(".")
        delattr(graph.module.get_submodule(owner), attr)
    if not weight_node.users:
        g.erase_node(weight_node)
        graph.remove_parameter(weight_node.target)


def sparsify(
    graph: Graph,
    mode: str = "auto",
    min_sparsity: float = 0.7,
    min_numel: int = 65536,
    timing: bool = False,
    timing_batch: int = 1,
    kernel: str = "measure",
) -> dict[str, dict[str, Any]]:
    """Convert the masked weights of ``graph`` as the module doc says; returns a row per weight."""
    rows: dict[str, dict[str, Any]] = {}
    kinds: dict[tuple, list[tuple[str, int]]] = {}  # see _kind
    plans: dict[str, tuple[list[int], list[int]]] = {}  # measured, by the first of each kind
    verdicts: dict[str, tuple[float, float]] = {}  # dense and CSR seconds of a kind's first
    for mul in list(mask_nodes(graph)):
        name = mask_of(mul)
        weight_node, mask_node = mul.args
        weight = graph.parameter(name).detach()
        mask = graph.module.get_buffer(mask_node.target)
        kept = int(mask.sum())
        op = meta.entries(weight_node).get("op", "other")
        positions = _positions(graph, mul.users, conv=op.startswith("conv"))
        row: dict[str, Any] = {
            "shape": tuple(weight.shape), "sparsity": 1 - kept / max(mask.numel(), 1),
            "params": [weight.numel(), weight.numel()],
            # per example, as shrink counts them: [before, after]
            "flops": [2 * weight.numel() * positions, 2 * weight.numel() * positions],
            "op": op,
        }
        rows[name] = row
        uses = [(u, _linear_use(u, mul)) for u in mul.users]
        reason = ""
        if not uses:
            reason = "the masked weight has no users"
        elif weight.dim() < 2:
            role = meta.entries(weight_node).get("role", "vector")
            reason = f"a {role} of {row['op']}: one dim, kept dense with its mask folded"
        elif weight.dim() != 2 or any(use is None for _, use in uses):
            ops = sorted({str(getattr(u.target, "__name__", u.target)) for u, use in uses if use is None})
            reason = ("conv: no sparse conv kernel, kept dense" if row["op"].startswith("conv")
                      else f"used by {', '.join(ops) or 'no op'}, which has no sparse kernel")
        elif len(weight_node.users) > 1:
            reason = "the weight has other users (shared weight), kept dense"
        elif weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
            reason = f"{weight.dtype}: the CPU CSR kernel supports float32/float64"
        if reason:
            row.update(decision="dense", reason=reason)
            continue
        transposed = uses[0][1][2]
        if any(use[2] != transposed for _, use in uses):
            row.update(decision="dense", reason="used both as (out, in) and (in, out)")
            continue
        w, m = (weight.t(), mask.t()) if transposed else (weight, mask)
        if weight.device.type == "cuda":
            tensor, why = semi_structured(w.contiguous(), m.contiguous())
            if tensor is None:
                row.update(decision="dense", reason=why)
                continue
            _replace_with_semi_structured(graph, mul, name, tensor, uses)
            row.update(decision="semi-structured", reason="2:4 mask on CUDA")
            row["params"][1], row["flops"][1] = kept, 2 * kept * positions
            continue
        # counted, not compared as floats: a mask at exactly min_sparsity keeps the rounded
        # count kept_count gives (4096² at 0.7: 5,033,165 kept, a sparsity of 0.69999999)
        denser = kept > kept_count(mask.numel(), min_sparsity)
        if mode == "auto" and (denser or weight.numel() < min_numel):
            row.update(decision="dense", reason=(
                f"sparsity {row['sparsity']:.3f} < min_sparsity {min_sparsity}" if denser else
                f"{weight.numel()} weights < min_numel {min_numel} (call overhead)"))
            if timing:
                x = torch.randn(timing_batch, w.shape[1], dtype=w.dtype)
                dense_w = (w * m).contiguous()
                row["latency_us"] = [median_seconds(lambda x=x, w=dense_w: F.linear(x, w)) * 1e6] * 2
            continue
        csr = to_csr(w, m)
        like = _kind(kinds, name, tuple(w.shape), w.dtype, kept)
        plan = _plan(csr, tuple(w.shape), kernel, row, name, like, plans)
        if mode == "measure" and not timing and like in verdicts:  # decided for its kind
            dense_s, sparse_s = verdicts[like]
            row.update(latency_us=[dense_s * 1e6, sparse_s * 1e6], measured_on=like)
        elif timing or mode == "measure":
            dense_s, sparse_s = verdicts[name] = _time_layer((w * m).contiguous(), csr, plan,
                                                             timing_batch)
            row["latency_us"] = [dense_s * 1e6, sparse_s * 1e6]
        if mode == "measure":
            reason = (f"measured at batch {timing_batch}"
                      + (f" on {row['measured_on']}" if "measured_on" in row else "")
                      + f": csr {sparse_s * 1e6:.1f} µs vs dense {dense_s * 1e6:.1f} µs")
            if sparse_s >= dense_s:
                row.update(decision="dense", reason=reason)
                row["latency_us"][1] = row["latency_us"][0]
                continue
        elif mode == "all":
            reason = "mode=all"
        else:
            reason = (f"sparsity {row['sparsity']:.3f}: {kept} of {mask.numel()} kept, no more "
                      f"than a mask at min_sparsity {min_sparsity} keeps")
        _replace_with_csr(graph, mul, name, csr, tuple(w.shape), uses, plan)
        row.update(decision="csr", reason=reason)
        row["params"][1], row["flops"][1] = kept, 2 * kept * positions
    if _transpose_results(graph):
        graph.recompile()
    fold_masks(graph)  # the layers kept dense
    return rows


def csr_weights(graph: Graph) -> dict[str, tuple[Node, torch.Tensor]]:
    """The weights this pass stored as CSR, by their original names: for each, the first op
    that reads it and its mask (True at the stored entries: exactly the positions the mask
    kept), rebuilt from the CSR indices in the parameter's own layout (``(in, out)`` for a
    ``Conv1D``/``addmm`` weight). In a graph loaded from a ``.pt2`` (no chop metadata) the
    name comes from the values buffer (``fc1.weight_values``: ``fc1.weight``) and the shape
    from the rows and the input's size: the stored ``(out, in)`` layout."""
    found: dict[str, tuple[Node, torch.Tensor]] = {}
    for node in graph.module.graph.find_nodes(op="call_function", target=csr_linear):
        values, col, crow = node.args[1:4]
        if not all(isinstance(a, Node) and a.op == "get_attr" for a in (values, col, crow)):
            continue
        info = node.meta.get("chop", {}).get(SPARSE) or {}
        x = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
        name = info.get("weight", values.target.removesuffix("_values"))
        col, crow = (graph.module.get_buffer(a.target) for a in (col, crow))
        shape = info.get("shape") or (
            (len(crow) - 1, x.shape[-1]) if isinstance(x, torch.Tensor) else None)
        if info.get("format", "csr") != "csr" or name in found or shape is None:
            continue
        rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device),
                                       crow.diff().long())
        mask = torch.zeros(tuple(shape), dtype=torch.bool, device=crow.device)
        mask[rows, col.long()] = True
        found[name] = (node, mask.t().contiguous() if info.get("transposed") else mask)
    return found


def totals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sums of the per-layer parameters, FLOPs (and latencies, when timed) of ``rows``."""
    total = {k: [sum(r[k][0] for r in rows.values()), sum(r[k][1] for r in rows.values())]
             for k in ("params", "flops", "latency_us")
             if rows and all(k in r for r in rows.values())}
    total["layers"] = len(rows)
    total["csr"] = sum(r["decision"] == "csr" for r in rows.values())
    total["semi_structured"] = sum(r["decision"] == "semi-structured" for r in rows.values())
    return total


@dataclass(frozen=True)
class Sparse(Pass):
    """Store masked linear weights as CSR (measured CPU kernel; 2:4 on CUDA) where faster."""

    name: ClassVar[str] = "sparse"
    kind: ClassVar[Literal["export"]] = "export"
    preserves: ClassVar[tuple[str, ...]] = ("saliency", "mask")
    reshapes: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("mask",)

    mode: Literal["auto", "all", "measure"] = option(
        "auto", "auto: by min_sparsity/min_numel; measure: time both kernels; all: every layer"
    )
    min_sparsity: float = option(0.7, "auto: keep layers less sparse than this dense, in [0, 1]")
    min_numel: int = option(65536, "auto: keep weights with fewer entries dense (call overhead)")
    timing: bool = option(False, "time each layer (and the model, given data) before and after")
    timing_batch: int = option(1, "batch size used to time layers (timing, mode=measure)")
    kernel: Literal["measure", "torch-linear", "torch-mm", "scipy", "torch-mv",
                    "torch-dense"] = option(
        "measure", "CSR kernel: measure (time each per row band, keep the fastest) or one by name"
    )

    def check(self) -> None:
        if not 0.0 <= self.min_sparsity <= 1.0:
            raise OptionError(
                f"sparse: min_sparsity={self.min_sparsity} is out of range; it must be in [0, 1] "
                "(0.7 converts layers with at least 70% of their weights pruned)"
            )
        if self.min_numel < 0:
            raise OptionError(f"sparse: min_numel={self.min_numel} must be >= 0")
        if self.timing_batch < 1:
            raise OptionError(f"sparse: timing_batch={self.timing_batch} must be >= 1")

    def apply(self, graph: Graph, ctx: Context) -> PassResult:
        if self.kernel == "scipy":
            require_scipy("sparse{kernel=scipy}")
        if not is_masked(graph):
            stored = graph.module.graph.find_nodes(op="call_function", target=csr_linear)
            if stored:
                raise PassError(
                    f"sparse: {graph.name} holds {len(stored)} layer(s) an earlier sparse "
                    "stored as CSR and no masks left to store: run sparse once")
            raise PassError(
                "sparse: the graph carries masks but no mask nodes: an earlier pass (fold, "
                "fold-bn, shrink) baked them into the weights; run sparse before it, e.g. "
                "\"mask{...}, sparse, fold-bn\""
            )
        rows, info = checked_export(graph, ctx, lambda: sparsify(
            graph, self.mode, self.min_sparsity, self.min_numel, self.timing, self.timing_batch,
            self.kernel,
        ), self.timing, "sparse")
        info.update(layers=rows, total=totals(rows))
        return PassResult(modified=bool(rows), info=info)
