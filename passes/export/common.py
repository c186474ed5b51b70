"""What every export pass shares: run the rewrite, check it against the masked graph, time it;
and :func:`deployable`, the exported graph without per-call overheads, for serving."""

from __future__ import annotations

import copy
import logging
import operator
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule

from chop.errors import InternalError
from chop.ir.graph import Graph, droppable_guards
from chop.ir.replay import WrittenBuffers, copied_inputs
from chop.kernels.csr import bind, csr_linear_forward
from chop.kernels.timing import median_seconds
from chop.pipeline.batches import call, check_same_outputs, cut_batch
from chop.pipeline.pass_base import Context

log = logging.getLogger("chop")


def checked_export(
    graph: Graph, ctx: Context, apply: Callable[[], Any], timing: bool, who: str
) -> tuple[Any, dict[str, Any]]:
    """Run ``apply()`` (the rewrite); when the pipeline has data, compare the outputs in eval
    mode before and after on the first two samples of the first batch, cut to their first 16
    positions along a dynamic sequence dim (:func:`~chop.pipeline.batches.cut_batch`; an
    :class:`~chop.errors.InternalError` from
    :func:`~chop.pipeline.batches.check_same_outputs` if they differ), reporting the seconds
    those two forwards took as ``check_s``, and, with ``timing``, report the model's median
    latency on the whole first batch before and after as ``model_latency_us = [before, after]``.

    Two samples, not the whole batch: in eval mode each sample's outputs depend on that sample
    alone, and a rewrite that is wrong is wrong on any sample, so the check costs two small
    forwards instead of two of the batch (most of an export pass's time on a large model). The
    same holds along a sequence: a wrong cut of a channel, head or weight shows at every
    position. Should the graph refuse the cut inputs, the check runs the first batch whole.

    A float32 model can be too ill-conditioned for the check's tolerance (inputs around 1000
    before a BatchNorm: both the model and a folded copy lose four digits to cancellation).
    When the outputs differ, the rewritten graph runs once more in float64 (a copy): a
    difference within :data:`ROUND_OFF_MARGIN` times its own float32 round-off passes, with a
    warning and ``check_round_off`` in the report; a larger one is the error.

    A buffer the forward writes in place (a call counter, a cache) is put back as it was
    before each check forward, and after the last, and each forward reads its own copy of the
    inputs: both forwards see the same state, and the check leaves none of its own."""
    if ctx.data is None:
        return apply(), {}
    inputs = next(iter(ctx.data))[0]
    info: dict[str, Any] = {}

    timed = copied_inputs(inputs) if timing else None  # (a forward may write its inputs)

    def run() -> Any:
        return call(graph.module, timed)

    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        state = WrittenBuffers(graph.module)
        start = time.perf_counter()
        sample = cut_batch(graph.module, inputs)
        try:
            before = call(graph.module, copied_inputs(sample))
        except Exception:  # noqa: BLE001 - e.g. a guard the bounds did not show: run them whole
            if sample is inputs:
                raise
            state.restore()
            start, sample = time.perf_counter(), inputs
            before = call(graph.module, copied_inputs(sample))
        checking = time.perf_counter() - start
        state.restore()
        if timing:
            info["model_latency_us"] = [median_seconds(run) * 1e6]
            state.restore()
    result = apply()
    with graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        start = time.perf_counter()
        after = call(graph.module, copied_inputs(sample))
        info["check_s"] = checking + time.perf_counter() - start
        state.restore()
        if timing:
            info["model_latency_us"].append(median_seconds(run) * 1e6)
            state.restore()
    try:
        check_same_outputs(f"the {who} graph", after, before)
    except InternalError:
        difference, noise = _largest_difference(after, before), _round_off(graph, sample, after)
        if difference is None or noise is None or difference > ROUND_OFF_MARGIN * noise:
            raise
        info["check_round_off"] = {"difference": difference, "float32_round_off": noise}
        log.warning("the %s graph differs from the pruned graph by up to %.3g, more than the "
                    "export check allows for the outputs' scale, but it is float32 round-off: "
                    "the %s graph computed in float64 differs from its float32 run by %.3g. The "
                    "model is ill-conditioned in float32 (e.g. inputs far from zero before a "
                    "BatchNorm); normalise its inputs for results exact to more digits",
                    who, difference, who, noise)
    return result, info


ROUND_OFF_MARGIN = 10.0  # how many times its own float32 round-off a rewrite may differ by


def _largest_difference(got: Any, expected: Any) -> float | None:
    """max |got − expected| over the floating-point tensors of two outputs of the same
    structure (NaN where both have NaN ignored), or None when they are not alike."""
    a, b = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    if len(a) != len(b):
        return None
    largest = 0.0
    for x, y in zip(a, b):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return None
        error = (x.double() - y.double()).abs()
        if bool(error.isnan().any()):
            if not torch.equal(x.isnan(), y.isnan()):
                return None
            error = error.nan_to_num(0.0)
        largest = max(largest, float(error.max())) if error.numel() else largest
    return largest


def _round_off(graph: Graph, sample: Any, outputs: Any) -> float | None:
    """How far ``outputs`` (the graph's float32 outputs on ``sample``) are from the same graph
    computed in float64 (a copy); None when they are not float32 or it cannot run so."""
    leaves = [t for t in pytree.tree_leaves(outputs)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves or any(t.dtype != torch.float32 for t in leaves):
        return None

    def wider(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    try:
        with graph.mode(batch_norm=False, dropout=False), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation
            twin = copy.deepcopy(graph.module).double()
            exact = call(twin, pytree.tree_map(wider, sample))
    except Exception:  # noqa: BLE001 - a graph that cannot run in float64 keeps the error
        return None
    return _largest_difference(outputs, exact)


def deployable(graph: Graph, *, contiguous_outputs: bool = True) -> GraphModule:
    """``graph.module`` for latency-critical inference, without the fixed costs of each call.

    A new GraphModule over the same parameters and buffers (nothing is copied) that computes
    what ``graph`` computes in eval mode, minus these per-call costs:

    - the input guards of the exported module (a ``_guards_fn`` submodule call, ~30 µs; a wrong
      input shape now fails inside an op instead of with torch.export's message), when every
      input is a tensor: a number or flag that torch.export fixed at its traced value keeps
      them, so that another value still fails instead of being ignored;
    - the BatchNorm counter updates;
    - the pytree flattening of inputs and outputs, when the graph takes positional tensors and
      returns tensors in tuples, lists or dicts (other calling conventions, keyword inputs and
      Hugging Face outputs, keep it);
    - for each ``chop::csr_linear``: the dispatcher, the input checks but the width and dtype,
      and the rebuilding of the CSR tensor: the node calls a function made once by
      :func:`~chop.kernels.csr.bind`, which holds the layer's tensors itself (they are no
      longer the module's attributes, and it sees in-place changes to them; it is not re-bound
      when buffers are replaced).

    With ``contiguous_outputs=False`` a sparse layer whose result is an output of the graph, and
    read by no other op of it, returns it in the layout its kernel produced (the transpose of a row-major matrix, as
    torch's own ``W_csr @ x.T`` leaves it; the same values), saving the copy into row-major
    order (~0.1 ms for 4096 × 32 floats). Inputs and outputs otherwise keep the graph's calling
    convention. Inference only: BatchNorm and dropout are fixed in eval mode, ``train()``
    changes nothing, and sparse layers have no autograd — call it under
    ``torch.inference_mode()``. ``graph`` itself, and its ``.pt2`` export, are unchanged.
    """
    with graph.mode(batch_norm=False, dropout=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation
        fx = copy.deepcopy(graph.module.graph)
    output = fx.output_node()
    guards = droppable_guards(fx)
    for node in list(fx.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and guards:
            fx.erase_node(node)
        elif node.target is torch.ops.chop.csr_linear.default:
            # its own layout only for a result that the graph returns and reads nowhere else
            _bind_sparse(graph, node, contiguous_outputs or set(node.users) != {output})
    _plain_calls(fx)
    module = GraphModule(graph.module, fx, class_name="Deployable")
    fx.eliminate_dead_code()  # the eval-mode counter adds, the sparse layers' attribute reads
    module.recompile()
    return module.eval()


_CSR_ARGS = ("x", "values", "col_indices", "crow_indices", "out_features", "bias", "kernels",
             "from_rows", "transposed", "in_features")  # chop::csr_linear's schema, in order


def _bind_sparse(graph: Graph, node: torch.fx.Node, contiguous: bool) -> None:
    """Point a ``csr_linear`` node at its layer bound by :func:`~chop.kernels.csr.bind`."""
    args = {"bias": None, "kernels": None, "from_rows": None, "transposed": False,
            "in_features": None, **dict(zip(_CSR_ARGS, node.args)), **node.kwargs}
    x, values, col, crow, out_features, bias, kernels, from_rows, transposed, _ = (
        args[name] for name in _CSR_ARGS)
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    held = (values, col, crow) + ((bias,) if bias is not None else ())
    if not (isinstance(val, torch.Tensor) and isinstance(val.shape[-1], int)
            and isinstance(out_features, int)
            and all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in held)):
        node.target = csr_linear_forward  # tensors made by the graph: the plain function
        args["transposed"] = transposed or not contiguous
        node.args, node.kwargs = tuple(args[name] for name in _CSR_ARGS), {}
        return
    tensors = [None if a is None else operator.attrgetter(a.target)(graph.module)
               for a in (values, col, crow, bias)]
    node.target = bind(*tensors[:3], (out_features, val.shape[-1]), tensors[3], kernels,
                       from_rows, transposed or not contiguous)
    node.args, node.kwargs = (x,), {}


def _plain_calls(fx: torch.fx.Graph) -> None:
    """Replace an exported graph's pytree calling convention by plain arguments and return
    values, where the two are the same: positional tensor inputs, outputs in tuples, lists
    and dicts."""
    codegen = fx._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return
    args, kwargs = info.in_spec.children() if info.in_spec.type is tuple else (None, None)
    placeholders = fx.find_nodes(op="placeholder")
    if (args is None or args.type is not tuple or kwargs.type is not dict or kwargs.num_children
            or args.num_children != len(placeholders)
            or not all(c.is_leaf() for c in args.children()) or not _plain(info.out_spec)):
        return
    output = fx.output_node()
    output.args = (pytree.tree_unflatten(list(output.args[0]), info.out_spec),)
    fx._codegen = torch.fx.graph.CodeGen()


def _plain(spec: pytree.TreeSpec) -> bool:
    return spec.is_leaf() or (spec.type in (tuple, list, dict)
                              and all(_plain(c) for c in spec.children()))
