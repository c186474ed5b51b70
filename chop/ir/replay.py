"""Running a model twice and comparing: what :func:`chop.trace` and the export check need.

- :class:`WrittenBuffers`: the buffers an fx graph's forward writes in place (a call counter,
  a cache, a power iteration's vector), saved once and put back after each run, so that two
  runs start from the same state and the comparison leaves none of its own.
- :func:`output_difference`: how two model outputs (tensors or nested structures of them)
  differ beyond float round-off, in words, or None.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule, Node


class WrittenBuffers:
    """The buffers ``graph_module``'s fx graph writes in place (an in-place op's written
    argument, or a view of it, read from a buffer), copied now from ``module`` (default: the
    graph module itself; any module with buffers of the same names, as the model a graph was
    traced from); :meth:`restore` puts them back, by name (a rewrite may have replaced the
    module's other tensors, not these)."""

    def __init__(self, graph_module: GraphModule, module: nn.Module | None = None):
        buffers = dict(graph_module.named_buffers())
        written = set()
        for node in graph_module.graph.nodes:
            schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
            if schema is None or not schema.is_mutable:
                continue
            for arg, value in zip(schema.arguments, node.args):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    base = _viewed_base(value)
                    if base is not None and base.op == "get_attr" and base.target in buffers:
                        written.add(base.target)
        self.names = sorted(written)
        self.module = graph_module if module is None else module
        self.saved = {name: self.module.get_buffer(name).clone() for name in self.names}

    def restore(self, module: nn.Module | None = None) -> None:
        """Put the saved values back into ``module``'s buffers of those names (default: the
        module they were saved from)."""
        module = self.module if module is None else module
        with torch.no_grad():
            for name, value in self.saved.items():
                module.get_buffer(name).copy_(value)


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
    differently (folded BatchNorm) differs by about one epsilon there. NaN must meet NaN.
    """
    a = [x for x in pytree.tree_leaves(got) if isinstance(x, torch.Tensor)]
    b = [x for x in pytree.tree_leaves(expected) if isinstance(x, torch.Tensor)]
    if len(a) != len(b):
        return f"{len(a)} outputs instead of {len(b)}"
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
            finite = ~y.isnan()
            error = float((x - y)[finite].abs().max()) if bool(finite.any()) else 0.0
            scale = float(y[finite].abs().max()) if bool(finite.any()) else 0.0
            if error > tolerance * max(scale, 1e-6):
                return (f"output {i} differs by up to {error:.3g} (the output's scale is "
                        f"{scale:.3g}, tolerance {tolerance:.2g} of it)")
        elif not torch.equal(x, y):
            return f"output {i} (integer) differs"
    return None
