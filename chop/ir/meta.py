"""Typed entries under ``node.meta["chop"]``.

Each entry has one owner (the pass or frontend step that writes it) and a check that the lint
between passes runs. Passes read and write entries through :func:`entries`; the pass manager uses
the key names to match what one pass ``requires`` with what another ``provides``.

Entries on weight nodes (``get_attr`` nodes of parameters):

- ``role`` (str, owner: :func:`chop.trace`): how the graph uses the parameter — ``"linear"``,
  ``"conv"``, ``"embedding"``, ``"norm"``, ``"bias"`` or ``"other"``.
- ``op`` (str, owner: :func:`chop.trace`): the ATen op that consumes it, e.g. ``"conv2d"``.
- ``saliency`` (float tensor of the weight's shape, owner: criterion passes such as ``snip``).
- ``mask`` (bool tensor of the weight's shape, True = kept, owner: the ``mask`` pass).
- ``channel_groups`` (dict dim -> LongTensor of the group id of each index, -1 = none; owner:
  the ``channel-groups`` pass).
- ``effective`` (bool tensor of the weight's shape: kept weights on an input -> output path;
  owner: the ``collapse`` pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node


@dataclass(frozen=True)
class MetaKey:
    """A typed metadata entry: its name, who writes it, and how to validate a value."""

    name: str
    owner: str
    check: Callable[[Any, torch.Tensor], str | None]


def _tensor_like(dtype_ok: Callable[[torch.dtype], bool], what: str):
    def check(value: Any, weight: torch.Tensor) -> str | None:
        if not isinstance(value, torch.Tensor):
            return f"expected a tensor, got {type(value).__name__}"
        if not dtype_ok(value.dtype):
            return f"expected a {what} tensor, got {value.dtype}"
        if value.shape != weight.shape:
            return f"shape {tuple(value.shape)} differs from the weight's {tuple(weight.shape)}"
        return None

    return check


def _string(value: Any, weight: torch.Tensor) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {type(value).__name__}"


def _group_ids(value: Any, weight: torch.Tensor) -> str | None:
    if not isinstance(value, dict):
        return f"expected a dict of dim -> group ids, got {type(value).__name__}"
    for dim, ids in value.items():
        if not isinstance(dim, int) or not 0 <= dim < weight.dim():
            return f"dim {dim!r} is not a dim of the weight {tuple(weight.shape)}"
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.shape != (weight.shape[dim],):
            return f"dim {dim}: expected {weight.shape[dim]} group ids (long), got {ids!r:.60}"
    return None


ROLE = MetaKey("role", "chop.trace", _string)
OP = MetaKey("op", "chop.trace", _string)
SALIENCY = MetaKey("saliency", "criterion passes", _tensor_like(lambda d: d.is_floating_point, "float"))
MASK = MetaKey("mask", "the mask pass", _tensor_like(lambda d: d == torch.bool, "bool"))
CHANNEL_GROUPS = MetaKey("channel_groups", "the channel-groups pass", _group_ids)
EFFECTIVE = MetaKey("effective", "the collapse pass", _tensor_like(lambda d: d == torch.bool, "bool"))

KEYS: dict[str, MetaKey] = {
    k.name: k for k in (ROLE, OP, SALIENCY, MASK, CHANNEL_GROUPS, EFFECTIVE)
}
# Keys that describe the graph as a pass found it, and go stale when another pass changes it
# (see ``Pass.preserves``). ``role`` and ``op`` are facts of the traced model and never do.
ANALYSES = ("saliency", "mask", "channel_groups", "effective")


def entries(node: Node) -> dict[str, Any]:
    """The chop metadata dict of ``node`` (created empty on first use)."""
    return node.meta.setdefault("chop", {})


def problems(node: Node, weight: torch.Tensor, names: Iterable[str] | None = None) -> list[str]:
    """Every entry of ``node`` (of the keys ``names``, None: all) that fails its key's check,
    as readable strings."""
    found = []
    chop = node.meta.get("chop", {})
    for name in chop if names is None else [n for n in names if n in chop]:
        key = KEYS.get(name)
        if key is None:
            continue  # entries of later passes or third-party passes are not ours to judge
        msg = key.check(chop[name], weight)
        if msg:
            found.append(f"node {node.name} ({node.target}): meta['chop'][{name!r}]: {msg}")
    return found
