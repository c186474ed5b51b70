"""The rewrite helpers every pass shares: mask nodes, prunable weights, new attributes.

A *mask node* is ``mul(weight, mask)`` inserted right after a weight node; the weight's users
read the ``mul`` instead, and ``mul.meta["chop"]["mask_of"]`` names the masked parameter. The
mask itself is a bool buffer ``<param>_mask`` on the parameter's own submodule, so it is in
``state_dict`` and survives save and load. Masked entries then get zero gradient and contribute
zero: training needs no re-masking after optimizer steps. The graph keeps the ``mul`` nodes;
the code generated from it runs each by :func:`mask_product`, aten's ``mul`` bit for bit but
faster on CPU (:func:`fast_mask_code`).

Which weights are *prunable* by default (linear and conv weights, as roles recorded by
:func:`chop.trace`) is decided here once, for the ``mask`` pass, the criteria's
``params=prunable`` and the training hooks alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import Node

from chop.ir import meta
from chop.ir.graph import COPY_TARGET, Graph

MASK_OF = "mask_of"  # meta["chop"] entry on an inserted mul node: the masked parameter's name
PRUNABLE_ROLES = ("linear", "conv")


_MUL = torch.ops.aten.mul.Tensor  # what a mask node computes


def mask_of(node: Any) -> str | None:
    """The parameter a mask ``mul`` node masks, or None for any other node (or value)."""
    return node.meta.get("chop", {}).get(MASK_OF) if isinstance(node, Node) else None


def factor(mask: torch.Tensor) -> torch.Tensor:
    """A bool ``mask`` as a 0/1 factor to multiply a float tensor by: its uint8 view (no copy).
    ``x * factor(mask)`` is exactly ``x * mask`` (same values and dtype, in place too), but
    faster on CPU, where torch does not vectorise a multiplication by a bool operand."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# multiply_masks_: the entries of a large tensor multiplied by its mask at a time (see there)
_CHUNK = 1 << 20


def multiply_masks_(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                    out: Sequence[torch.Tensor] | None = None) -> None:
    """``tensors[i] * masks[i]`` for every i, in place (or into ``out[i]``), with the very
    values of ``tensors[i].mul_(masks[i])``. A mask is bool or a factor (see :func:`factor`).

    On CPU torch multiplies a large float tensor by a uint8 operand several times slower
    than by a float one: a 30522×512 float32 embedding by its mask's uint8 view takes 38.7 ms
    over 2 threads, against 6.6 ms by a float copy of the mask. In pieces (of 2^18 entries
    then), all in one multi-tensor multiply, it took 8.6 ms, with no copy of the mask; so
    each large contiguous CPU tensor is multiplied piece by piece.

    Pieces of 2^20 entries, not 2^18: timed by hand in place after a sweep that evicts the
    caches (as gradients are masked after backward), 2 threads, the three 4096² gradients of a
    4096-wide MLP took 9.5 against 11.4 ms, BERT-base's 72 linear weights 17.1 against 21.0 ms;
    on one thread 2^20 was 0–8% faster. Larger pieces gain nothing more, and at 2^23 one 4096²
    gradient took 23–27 ms against 2.5–3.0 ms: the multiply seems to convert each piece's
    uint8 operand into a float buffer, which at 32 MiB glibc maps afresh at every call."""
    out = tensors if out is None else out
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for tensor, mask, into in zip(tensors, masks, out, strict=True):
        mask = factor(mask)
        if (tensor.numel() > _CHUNK and tensor.device.type == "cpu"
                and mask.shape == tensor.shape == into.shape and tensor.is_contiguous()
                and mask.is_contiguous() and into.is_contiguous()):
            parts.extend(zip(tensor.view(-1).split(_CHUNK), mask.view(-1).split(_CHUNK),
                             into.view(-1).split(_CHUNK)))
        else:
            parts.append((tensor, mask, into))
    if parts and out is tensors:
        torch._foreach_mul_([t for t, _, _ in parts], [m for _, m, _ in parts])
    else:
        for tensor, mask, into in parts:
            torch.mul(tensor, mask, out=into)


# masked, mask_product: a new tensor of more entries than this is multiplied piece by piece
_PIECES_FROM = 1 << 21


def masked(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor * mask`` as a new tensor, with its values and the layout ``tensor * mask``
    gives. A large contiguous CPU tensor (over ``_PIECES_FROM`` entries) is multiplied piece
    by piece as :func:`multiply_masks_` does; others by the mask's :func:`factor`, as is a
    tensor that requires grad (a gradient taken with ``create_graph``), by autograd's own op,
    which records the product. Timed by hand
    into warm memory, 2 threads: by the factor, a 1024×1024 float32 tensor 115 µs, in pieces
    169 µs; 4096×4096 24.7 ms by the factor, 6.2 ms in pieces (of 2^18 entries then)."""
    if ((tensor.requires_grad and torch.is_grad_enabled()) or tensor.numel() <= _PIECES_FROM
            or not tensor.is_contiguous()):
        return tensor * factor(mask)
    into = torch.empty_like(tensor)
    multiply_masks_([tensor], [mask], [into])
    return into


class _MaskProduct(torch.autograd.Function):
    """``weight * mask`` of a large weight and its gradient ``grad * mask``, both by
    :func:`masked` (aten's ``mul`` multiplies by the bool mask in both directions)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)  # an in-place change before backward fails, as for aten
        return masked(weight, mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return masked(grad, mask), None


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _forward_ad_active() -> bool:
    """Whether forward-mode AD may be on (``mul``'s ``out=`` form has no forward derivative)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def mask_product(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a mask node computes, ``aten.mul(weight, mask)``: the same values (NaN and -0.0
    included), layout and gradient, faster on CPU, where torch does not vectorise a multiply
    by a bool operand; the code a masked graph runs calls this for its mask nodes (see
    :func:`fast_mask_code`). By the mask's :func:`factor`, a contiguous weight of more than
    ``_PIECES_FROM`` entries by :func:`masked`'s pieces in both directions. Timed by hand, 2
    threads, product / product and gradient: a 768×768 float32 weight 289 / 660 µs by aten's
    ``mul``, 111 / 370 µs here; 4096×4096 59 / 116 ms against 34 / 67 ms (most of that the
    fresh memory of the results). Anything else
    (another device, a fake or traced tensor under ``torch.export``; torch.compile,
    ``torch.func`` transforms or forward-mode AD for the pieces) takes aten's ``mul``, or the
    factor."""
    if type(mask) is not torch.Tensor or mask.dtype is not torch.bool or mask.device.type != "cpu":
        return _MUL(weight, mask)
    if (weight.numel() > _PIECES_FROM and weight.shape == mask.shape and weight.is_contiguous()
            and mask.is_contiguous() and not torch.compiler.is_compiling()
            and not _functorch_active() and not _forward_ad_active()):
        if weight.requires_grad and torch.is_grad_enabled():
            return _MaskProduct.apply(weight, mask)
        return masked(weight, mask)
    return _MUL(weight, factor(mask))


class _MaskCode:
    """A mixin over fx's code generator: the code it writes calls :func:`mask_product` for each
    mask node (a ``mul`` node, or the ``torch.mul`` that :meth:`~chop.ir.graph.Graph.mode`'s
    lean code binds it to), while the graph keeps the ``mul`` nodes that passes, copies and
    ``torch.export`` read. Its targets are swapped only while the code is written."""

    def _gen_python_code(self, nodes: Any, *args: Any, **kwargs: Any) -> Any:
        swapped = [(n, n.target) for n in nodes if n.op == "call_function"
                   and n.target in _MULS and mask_of(n) is not None]
        for node, _ in swapped:  # not node.target =: fx would re-file the node by target
            object.__setattr__(node, "target", mask_product)
        try:
            return super()._gen_python_code(nodes, *args, **kwargs)  # type: ignore[misc]
        finally:
            for node, target in swapped:
                object.__setattr__(node, "target", target)


_MULS = (_MUL, torch.mul)
_PyTreeCodeGen = getattr(torch.fx.graph, "_PyTreeCodeGen", None)


class _MaskCodeGen(_MaskCode, torch.fx.graph.CodeGen):
    pass


_MASK_CODEGENS: dict[type, type] = {torch.fx.graph.CodeGen: _MaskCodeGen}
if _PyTreeCodeGen is not None:  # what torch.export's graphs use
    class _MaskPyTreeCodeGen(_MaskCode, _PyTreeCodeGen):  # type: ignore[misc, valid-type]
        pass

    _MASK_CODEGENS[_PyTreeCodeGen] = _MaskPyTreeCodeGen


def fast_mask_code(fx: torch.fx.Graph) -> None:
    """Make the code generated from ``fx`` from now on run its mask nodes by
    :func:`mask_product` (its copies too: fx copies the code generator). A generator of
    another kind is left as it is: its code multiplies by aten's ``mul``, as fast as before."""
    codegen = fx._codegen
    kind = _MASK_CODEGENS.get(type(codegen))
    if kind is not None:
        fast = kind.__new__(kind)
        fast.__dict__.update(codegen.__dict__)
        fx.set_codegen(fast)


def gradient_masker(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tensor hook: the gradient times ``mask``, what a mask node's backward computes (for a
    weight whose mask node passes it through, see :func:`weight_through`)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return masked(grad, mask)
    return hook


def mask_nodes(graph: Graph) -> Iterator[Node]:
    """Every mask ``mul`` node of ``graph``, in graph order."""
    return (n for n in graph.module.graph.nodes if mask_of(n) is not None)


def weight_through(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target a mask node takes while its mask is kept in the weight instead (inside
    :func:`~chop.training.loop.fast_masks`, which zeroes the pruned weights and masks their
    gradients itself): the weight, already masked, passed through unchanged."""
    return weight


def passed_through(graph: Graph) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(weight, mask)`` of each mask node that passes its weight through for a while
    (:func:`weight_through`, its bool mask still its second argument, and a copy of the graph
    turning it back into the ``mul``): the gradients such a weight gets are not multiplied by
    its mask. (A node that computes something else, as iterative SNIP's straight-through
    estimator does, is not.) An indexed lookup of the nodes by target, not a walk."""
    found = []
    for n in graph.module.graph.find_nodes(op="call_function", target=weight_through):
        if mask_of(n) is None or n.meta.get(COPY_TARGET) is not _MUL:
            continue
        mask = graph.module.get_buffer(n.args[1].target)
        if mask.dtype == torch.bool:
            found.append((graph.parameter(mask_of(n)), mask))
    return found


def is_masked(graph: Graph) -> bool:
    """Whether ``graph`` has any mask node."""
    return next(mask_nodes(graph), None) is not None


def weight_name(graph: Graph, arg: Any) -> str | None:
    """The parameter an op argument reads: a weight node's target, or the parameter behind a
    mask node; None for anything else (activations, constants, buffers)."""
    if not isinstance(arg, Node):
        return None
    if arg.op == "get_attr":
        return arg.target if isinstance(arg.target, str) and _is_parameter(graph, arg.target) else None
    return mask_of(arg)


def _is_parameter(graph: Graph, name: str) -> bool:
    try:
        graph.module.get_parameter(name)
    except AttributeError:
        return False
    return True


def fresh_attribute(owner: nn.Module, attr: str) -> str:
    """``attr``, or ``attr`` followed by as many ``_`` as needed to be a new name on ``owner``
    (e.g. a model already pruned with ``torch.nn.utils.prune`` has ``weight_mask``)."""
    while hasattr(owner, attr):
        attr += "_"
    return attr


def add_tensor(graph: Graph, beside: str, attr: str, value: torch.Tensor, *,
               parameter: bool = False, persistent: bool = True) -> str:
    """Register ``value`` as a new buffer (or parameter) named after ``attr`` on the submodule
    that owns ``beside`` (a qualified name); returns the new tensor's qualified name."""
    owner_name, _, _ = beside.rpartition(".")
    owner = graph.module.get_submodule(owner_name)
    attr = fresh_attribute(owner, attr)
    if parameter:
        owner.register_parameter(attr, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
    else:
        owner.register_buffer(attr, value, persistent=persistent)
    return f"{owner_name}.{attr}" if owner_name else attr


def select_weights(
    graph: Graph,
    include: str | None = None,
    exclude: str | None = None,
    *,
    biases: bool = False,
    norms: bool = False,
    embeddings: bool = False,
) -> list[Node]:
    """Weight nodes to prune: linear and conv weights (plus the roles asked for), filtered by
    ``include``/``exclude`` regexes searched in the parameter name. Remembered while the graph's
    structure holds (a training loop selects at every pruning step)."""
    key = ("select_weights", include, exclude, biases, norms, embeddings)
    memo = graph.memo()
    if key not in memo:
        roles = set(PRUNABLE_ROLES) | {
            r for r, on in (("bias", biases), ("norm", norms), ("embedding", embeddings)) if on
        }
        memo[key] = [
            n for n in graph.weight_nodes()
            if meta.entries(n).get("role") in roles
            and (include is None or re.search(include, n.target))
            and (exclude is None or not re.search(exclude, n.target))
        ]
    return list(memo[key])


def is_mask_of(mask: Any, weight: torch.Tensor) -> bool:
    """Whether ``mask`` can be ``weight``'s mask (from a file or a caller): a tensor of the
    weight's shape, bool or holding only 0 and 1."""
    return (isinstance(mask, torch.Tensor) and mask.shape == weight.shape
            and (mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())))


def insert_mask(graph: Graph, node: Node, mask: torch.Tensor) -> bool:
    """Mask weight ``node`` with ``mask`` (bool, True = kept): add or update its mask buffer and
    its ``mul`` node. Records the mask in ``node.meta["chop"]["mask"]``. Returns whether it
    added nodes (the weight was not masked yet): then call ``graph.recompile()`` after the
    last one."""
    return insert_masks(graph, [node], [mask])


def insert_masks(graph: Graph, nodes: list[Node], masks: list[torch.Tensor]) -> bool:
    """:func:`insert_mask` for each of ``nodes``: the masks of weights masked already are
    copied into their buffers in one ``torch._foreach_copy_`` (a training loop re-masks every
    weight at each pruning step), the others get a mask node. Returns whether nodes were added
    (then call ``graph.recompile()``)."""
    owners = graph.memo().setdefault("mask buffer owners", {})  # name -> (submodule, attr)
    buffers, updates, added = [], [], False
    for node, mask in zip(nodes, masks, strict=True):
        if mask.dtype != torch.bool:
            mask = mask.to(torch.bool)
        meta.entries(node)["mask"] = mask
        where = owners.get(node.target) or _mask_buffer_owner(graph, node)
        if where is None:
            _add_mask_node(graph, node, mask)
            added = True
            continue
        owners[node.target] = where
        buffers.append(where[0]._buffers[where[1]])  # read afresh: module.to() replaces buffers
        updates.append(mask)
    if updates:
        torch._foreach_copy_(buffers, updates)
    return added


def _mask_buffer_owner(graph: Graph, node: Node) -> tuple[nn.Module, str] | None:
    """The submodule and attribute of weight ``node``'s mask buffer; None if it has no mask
    node."""
    for user in node.users:
        if mask_of(user) == node.target:
            return graph.owner(user.args[1].target)
    return None


def _add_mask_node(graph: Graph, node: Node, mask: torch.Tensor) -> None:
    """A new mask buffer (a copy of ``mask``) and ``mul`` node for weight ``node``."""
    name = node.target
    target = add_tensor(graph, name, f"{name.rpartition('.')[2]}_mask", mask.clone())
    fx = graph.module.graph
    with fx.inserting_after(node):
        mask_node = fx.get_attr(target)
    with fx.inserting_after(mask_node):
        mul = fx.call_function(_MUL, (node, mask_node))
    node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    meta.entries(mul)[MASK_OF] = name
    fast_mask_code(fx)
    if "val" in node.meta:
        mul.meta["val"] = node.meta["val"]


def restore_masks(graph: Graph) -> None:
    """Insert a mask node for every weight whose ``mask`` metadata has none (e.g. after
    ``fold``), so the graph computes with its masks again."""
    missing = [n for n in graph.weight_nodes() if "mask" in meta.entries(n)
               and not any(mask_of(u) == n.target for u in n.users)]
    if insert_masks(graph, missing, [meta.entries(n)["mask"] for n in missing]):
        graph.recompile()


def current_masks(graph: Graph) -> dict[str, torch.Tensor]:
    """The bool mask of every masked parameter, by name (from the ``mask`` metadata)."""
    return {n.target: meta.entries(n)["mask"] for n in graph.weight_nodes()
            if "mask" in meta.entries(n)}
