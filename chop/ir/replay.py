"""Running a model twice and comparing: what :func:`chop.trace`, the export check and the
output files' check need.

- :class:`WrittenBuffers`: the buffers an fx graph's forward writes in place (a call counter,
  a cache, a power iteration's vector), saved once and put back after each run, so that two
  runs start from the same state and the comparison leaves none of its own.
- :func:`output_difference`: how two model outputs (tensors or nested structures of them)
  differ beyond float round-off, in words, or None.
- :func:`copied_inputs`: inputs with each tensor copied, for a forward that may write them.
- :func:`cut_inputs`: inputs cut to a few samples and positions along the dims the graph
  traced as dynamic: two runs compared on them cost a fraction of two runs of a whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import Graph, GraphModule, Node


class WrittenBuffers:
    """The buffers and parameters ``graph_module``'s fx graph writes in place (an in-place op's
    written argument, or a view of it, read from one), in the graph itself or in the graph of a
    higher-order op's submodule (a ``torch.no_grad()`` or ``torch.autocast`` block: an EMA
    update, a weight clamp, a power iteration's vector), copied now from ``module`` (default:
    the graph module itself; any module with tensors of the same names, as the model a graph
    was traced from); :meth:`restore` puts them back, by name (a rewrite may have replaced the
    module's other tensors, not these)."""

    def __init__(self, graph_module: GraphModule, module: nn.Module | None = None):
        state = {name for name, _ in graph_module.named_buffers()}
        state |= {name for name, _ in graph_module.named_parameters()}
        written = {base.target for base in _written(graph_module, graph_module.graph)
                   if base.op == "get_attr" and base.target in state}
        self.names = sorted(written)
        self.module = graph_module if module is None else module
        self.saved = {name: _state(self.module, name).detach().clone() for name in self.names}

    def restore(self, module: nn.Module | None = None) -> None:
        """Put the saved values back into ``module``'s tensors of those names (default: the
        module they were saved from)."""
        module = self.module if module is None else module
        with torch.no_grad():
            for name, value in self.saved.items():
                _state(module, name).copy_(value)


def copied_inputs(inputs: Any) -> Any:
    """``inputs`` (any nesting) with each tensor replaced by a copy of it: a forward may write
    its inputs in place, which would change the caller's data and the next run's inputs."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), inputs)


CHECK_SAMPLES = 2  # samples a comparison keeps along a dynamic batch dim
CHECK_LENGTH = 16  # positions it keeps along another dynamic dim (a token sequence)


def cut_inputs(module: GraphModule, args: tuple, kwargs: dict[str, Any], *,
               positions: bool = True) -> tuple[tuple, dict]:
    """``(args, kwargs)``, the inputs of the exported ``module``, cut along every dim it traced
    as a dynamic size of its own (a symbol): to the first ``CHECK_SAMPLES`` samples where the
    symbol is a leading (batch) dim and, with ``positions``, to ``CHECK_LENGTH`` positions
    elsewhere (a sequence), never below the smallest size the module accepts for it. The same
    two objects when nothing is cut or they are not the module's inputs one to one.

    Two runs compared on the cut inputs cost a fraction of two runs of the whole batch, and a
    difference between two computations of one model (training-only code, a wrong rewrite)
    shows on any sample and at any position. A module that refuses the cut inputs (a guard
    its bounds did not show) is run on the whole inputs by the caller."""
    spec = getattr(module, "_in_spec", None)
    if spec is None or spec.num_children != 2:
        return args, kwargs
    positional, keywords = spec.children()
    if len(args) != positional.num_children or set(kwargs) != set(keywords.context or ()):
        return args, kwargs  # not the module's inputs: its own call says what is wrong
    try:
        leaves = torch.fx._pytree.tree_flatten_spec((args, kwargs), spec)
    except Exception:  # noqa: BLE001 - nested otherwise than the module was traced with
        return args, kwargs
    vals = [n.meta.get("val") for n in module.graph.find_nodes(op="placeholder")]
    if len(leaves) != len(vals):
        return args, kwargs
    dims = []  # (input tensor, dim, its size's symbol)
    for leaf, val in zip(leaves, vals):
        if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
            dims += [(leaf, d, size) for d, size in enumerate(val.shape[:leaf.dim()])
                     if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol
                     and (positions or d == 0)]
    keep: dict[Any, int] = {}  # symbol -> how much of it the comparison runs
    for _, d, size in dims:
        bounds = size.node.shape_env.var_to_range.get(size.node.expr)
        low = int(bounds.lower) if bounds is not None and bounds.lower.is_integer else None
        if low is not None:
            n = max(low, CHECK_SAMPLES if d == 0 else CHECK_LENGTH)
            keep[size.node.expr] = min(keep.get(size.node.expr, n), n)
    cuts: dict[int, dict[int, int]] = {}  # id of an input tensor -> {dim: new size}
    for leaf, d, size in dims:
        n = keep.get(size.node.expr)
        if n is not None and n < leaf.shape[d]:
            cuts.setdefault(id(leaf), {})[d] = n
    if not cuts:
        return args, kwargs

    def cut(x: Any) -> Any:
        for d, n in cuts.get(id(x), {}).items():
            x = x.narrow(d, 0, n)
        return x

    return pytree.tree_map(cut, (args, kwargs))


def _state(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s parameter or buffer ``name`` (a dotted path)."""
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _written(owner: nn.Module, graph: Graph) -> Iterator[Node]:
    """The nodes of ``graph`` (a graph of ``owner``) whose tensors its ops write in place,
    following writes inside the submodules of higher-order ops back to their operands."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and not isinstance(node.target, torch._ops.HigherOrderOperator):
            if schema.is_mutable:
                for i, arg in enumerate(schema.arguments):
                    if arg.alias_info is not None and arg.alias_info.is_write:
                        base = _viewed_base(node.args[i] if i < len(node.args)
                                            else node.kwargs.get(arg.name))  # out=...
                        if base is not None:
                            yield base
            continue
        subs = [i for i, a in enumerate(node.args) if isinstance(a, Node) and a.op == "get_attr"
                and isinstance(getattr(owner, a.target, None), GraphModule)]
        if not subs:
            continue
        operands = pytree.tree_leaves(list(node.args[subs[-1] + 1:]))
        for i in subs:
            sub = getattr(owner, node.args[i].target)
            inputs = sub.graph.find_nodes(op="placeholder")
            for base in _written(sub, sub.graph):
                at = inputs.index(base) if base in inputs else len(operands)
                outer = _viewed_base(operands[at]) if at < len(operands) else None
                if outer is not None:
                    yield outer


def _viewed_base(value: Any) -> Node | None:
    """The node ``value`` is a view of (following ops whose result aliases their first
    argument, as ``slice`` and ``select``), or ``value`` itself; None if not a node."""
    while isinstance(value, Node) and value.op == "call_function":
        schema = getattr(value.target, "_schema", None)
        if (schema is None or not schema.returns or schema.returns[0].alias_info is None
                or not value.args):
            break
        value = value.args[0]
    return value if isinstance(value, Node) else None


def output_difference(got: Any, expected: Any, *, rtol: float = 1e-4) -> str | None:
    """How ``got`` fails to reproduce ``expected`` up to float round-off, or None.

    The tolerance is relative to each output's scale: ``max |got − expected| <= rtol · max(1e-6,
    max |expected|)`` per tensor, so logits near zero in a large-valued output do not fail on
    float32 round-off (an element-wise ``atol`` did, on ResNet-50), while a real difference of
    even one in ten thousand of the output's range does. In half precision the tolerance is
    four of the dtype's epsilon (bfloat16: 0.031, float16: 0.0039): a rewrite that rounds
    differently (folded BatchNorm) differs by about one epsilon there. NaN must meet NaN, and an
    infinity the same infinity. Outputs that are not tensors (a flag, a constant) must be equal.
    """
    leaves_got, leaves_expected = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    a = [x for x in leaves_got if isinstance(x, torch.Tensor)]
    b = [x for x in leaves_expected if isinstance(x, torch.Tensor)]
    if len(a) != len(b):
        return f"{len(a)} outputs instead of {len(b)}"
    others = [x for x in leaves_got if not isinstance(x, torch.Tensor)]
    for x, y in zip(others, [y for y in leaves_expected if not isinstance(y, torch.Tensor)]):
        if type(x) is not type(y) or (isinstance(x, (bool, int, float, str, type(None)))
                                      and x != y and not (x != x and y != y)):
            return f"an output that is not a tensor is {x!r} instead of {y!r}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        if x.is_floating_point() or y.is_floating_point():
            low = min((t.dtype for t in (x, y) if t.is_floating_point()),
                      key=lambda d: torch.finfo(d).bits)
            tolerance = max(rtol, 4 * torch.finfo(low).eps)
            x, y = x.detach().double(), y.detach().double()
            if not torch.equal(x.isnan(), y.isnan()):
                return f"output {i} has NaN where the original has none (or the reverse)"
            infinite = y.isinf()
            if not torch.equal(x.isinf(), infinite) or not torch.equal(x[infinite], y[infinite]):
                return f"output {i} has an infinity where the original has none (or the reverse)"
            finite = y.isfinite()
            error = float((x - y)[finite].abs().max()) if bool(finite.any()) else 0.0
            scale = float(y[finite].abs().max()) if bool(finite.any()) else 0.0
            if error > tolerance * max(scale, 1e-6):
                return (f"output {i} differs by up to {error:.3g} (the output's scale is "
                        f"{scale:.3g}, tolerance {tolerance:.2g} of it)")
        elif not torch.equal(x, y):
            return f"output {i} (integer) differs"
    return None
