"""Node shapes after an export pass removed channels: ``meta["val"]`` updated from the cut sizes.

Recomputing every node with fake tensors (``FakeTensorProp``) costs milliseconds per node under
symbolic batch sizes, most of shrink on a large model. The cut says what changed, so
:func:`refresh_shapes` only redoes what it must, in graph order:

- a weight (``get_attr``) whose tensor changed shape, or that has no fake value yet (a bias
  shrink created): a fake copy of the tensor;
- a node whose channels lost positions (``sizes``): its value with those dims resized; the
  other dims keep their (symbolic) sizes, and the dim order of its strides is kept;
- a node none of whose channels went, but whose sizes were spelt out and edited (``edited``)
  or that reads a changed value: its op, run on the fake values of its operands (exact, as
  ``FakeTensorProp`` does it), for the few such nodes (split, a tuple result, a mask built
  by ``zeros``);
- anything else is unchanged.

A dim whose channels are folded into the batch (``nn.MultiheadAttention``) is never resized by
hand: its node runs its op. Should any of that fail, every node is recomputed with
``FakeTensorProp``; should that fail too, the call nodes' values are dropped (stale shapes
would mislead later analyses)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.fx import Node
from torch.fx.node import map_aggregate, map_arg

from chop.ir.graph import Graph
from chop.passes.analysis.flow.rule import Tag

log = logging.getLogger("chop")


def refresh_shapes(graph: Graph, tags: Mapping[Node, Tag], sizes: Mapping[Node, Mapping[int, int]],
                   edited: Collection[Node] = ()) -> None:
    """Update ``meta["val"]`` of the nodes of ``graph`` after channels went: ``tags`` are the
    channel layouts (the walk's), ``sizes`` the new size of each channel dim of every node that
    lost channels, ``edited`` the nodes whose arguments were rewritten. See the module doc."""
    mode = _fake_mode(graph)
    if mode is None:
        return propagate_shapes(graph)
    try:
        with mode, _uncached(mode):
            _refresh(graph, mode, tags, sizes, set(edited))
    except Exception as e:  # anything unexpected: the slow, general way
        log.debug("shrink: updating node shapes from the cut failed (%s); recomputing them all", e)
        propagate_shapes(graph)


@contextmanager
def _uncached(mode: Any) -> Iterator[None]:
    """``mode`` without its dispatch cache: the ops the update runs through the mode
    (:func:`_run`, each on changed values, once) would only fill it, and filling it costs about
    what the op does. (The fake values :func:`_empty` makes do not go through the dispatch.)"""
    cached = getattr(mode, "cache_enabled", False)
    mode.cache_enabled = False
    try:
        yield
    finally:
        mode.cache_enabled = cached


def propagate_shapes(graph: Graph) -> None:
    """Recompute ``meta["val"]`` of every node with fake tensors (``FakeTensorProp``)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = list(graph.module.graph.find_nodes(op="placeholder"))
    vals = [n.meta.get("val") for n in placeholders]
    try:
        FakeTensorProp(graph.module, _fake_mode(graph)).propagate_dont_convert_inputs(*vals)
    except Exception as e:  # stale shapes would mislead later analyses: drop them instead
        log.debug("shrink: could not refresh node shapes (%s); dropping them", e)
        for node in graph.module.graph.nodes:
            if node.op == "call_function":
                node.meta.pop("val", None)


def _fake_mode(graph: Graph) -> Any:
    vals = [n.meta.get("val") for n in graph.module.graph.find_nodes(op="placeholder")]
    return next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)


def _refresh(graph: Graph, mode: Any, tags: Mapping[Node, Tag],
             sizes: Mapping[Node, Mapping[int, int]], edited: set[Node]) -> None:
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = {**dict(graph.module.named_buffers()), **dict(graph.module.named_parameters())}
    changed: set[Node] = set()
    made: dict[tuple, torch.Tensor] = {}  # one fake value per layout (slow to make, symbolic)
    for node in graph.module.graph.nodes:
        old = node.meta.get("val")
        if node.op == "get_attr":
            t = tensors.get(node.target)
            if t is not None and not (isinstance(old, FakeTensor) and old.shape == t.shape):
                node.meta["val"] = _empty(mode, made, t.shape, t.stride(), t.dtype, t.device,
                                          False)
                changed.add(node)  # as FakeTensorProp's value, without a copy of the tensor
        elif node.op != "call_function":
            continue
        elif node in sizes and isinstance(old, torch.Tensor):
            node.meta["val"] = _resized(mode, made, old, sizes[node]) if _resizable(
                old, tags[node]) else _run(node)
            changed.add(node)
        elif node in edited or (node not in tags and any(
                a in changed for a in node.all_input_nodes)):
            new = _run(node)
            if not _same_shapes(new, old):
                changed.add(node)
            node.meta["val"] = new


def _resizable(old: torch.Tensor, tag: Tag) -> bool:
    """Whether ``old``'s channel dims are static and as large as the tag says (then the new
    value is ``old`` with those sizes changed); not for channels folded into the batch."""
    return not tag.folded and all(
        d < old.dim() and isinstance(old.shape[d], int) and old.shape[d] == tag.atoms.shape[i]
        for i, d in enumerate(tag.dims))


def _resized(mode: Any, made: dict[tuple, torch.Tensor], old: torch.Tensor,
             sizes: Mapping[int, int]) -> torch.Tensor:
    """``old`` with the dims of ``sizes`` resized, its dims in the same order of strides."""
    shape = list(old.shape)
    for d, size in sizes.items():
        shape[d] = size
    strides = [size_hint(s) for s in old.stride()]
    layout = tuple(sorted(range(old.dim()), key=lambda d: (-strides[d], d)))  # outermost first
    return _empty(mode, made, shape, layout, old.dtype, old.device, old.requires_grad,
                  permuted=True)


def _empty(mode: Any, made: dict[tuple, torch.Tensor], shape: Any, order: Any,
           dtype: torch.dtype, device: torch.device, requires_grad: bool,
           permuted: bool = False) -> torch.Tensor:
    """A fake tensor of ``mode`` of ``shape`` with strides ``order`` (or, ``permuted``, the
    dims from outermost to innermost), made once per distinct layout: nodes of equal layout
    share it, as an in-place op shares its input's value under ``FakeTensorProp``. Sizes are
    keyed by their expression: equal symbols are equal sizes.

    Made as the fake mode makes a tensor constructor's result (the constructor on the meta
    device inside the mode's kernel invocation, wrapped as a FakeTensor of the real device),
    without the mode's dispatch around it, whose argument normalization and checks cost more
    than the symbolic tensor itself."""
    from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager

    key = (tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in shape), tuple(order),
           dtype, device, requires_grad, permuted)
    value = made.get(key)
    if value is None:
        meta = torch.device("meta")
        with in_kernel_invocation_manager(mode):
            value = (torch.empty_permuted(shape, order, dtype=dtype, device=meta,
                                          requires_grad=requires_grad) if permuted
                     else torch.empty_strided(shape, order, dtype=dtype, device=meta))
        value = made[key] = FakeTensor(mode, value, device)
    return value


def _run(node: Node) -> Any:
    """``node``'s op on its operands' fake values (inside the fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import snapshot_fake

    args, kwargs = map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    result = node.target(*args, **kwargs)
    return map_aggregate(result, lambda v: snapshot_fake(v) if isinstance(v, FakeTensor) else v)


def _same_shapes(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_shapes(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def size_hint(size: Any) -> int:
    """A size as an int: itself, or a symbolic size's value at the traced shapes."""
    if isinstance(size, int):
        return size
    hint = size.node.hint
    return int(hint) if hint is not None else int(size.node.shape_env.size_hint(size.node.expr))


def positions_per_example(graph: Graph, out: torch.Tensor, channel_dim: int) -> int:
    """How many times per example a layer whose result is ``out`` (its ``meta["val"]``) applies
    its weight, at the traced sizes: ``out``'s elements per example and output channel (1 for
    a linear layer on one vector, the output pixels of a conv, the tokens of a sequence).
    FLOPs per example are 2 · (weights used) · this."""
    batch = next((n.meta["val"].shape[0] for n in graph.module.graph.find_nodes(op="placeholder")
                  if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim()), 1)
    channels = size_hint(out.shape[channel_dim])
    return size_hint(out.numel()) // max(size_hint(batch), 1) // max(channels, 1)
