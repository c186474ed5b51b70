"""A functional view of the graph, for criteria that evaluate it on substituted weights
(``synflow`` on |θ|, ``exact-salience`` on ablated weights) without touching its own tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from chop.errors import DataError
from chop.ir.graph import Graph


def functional_state(
    graph: Graph, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies of the graph's parameters and buffers by name, floating ones cast to
    ``dtype`` (if given), for :func:`functional_forward`: computing with them never touches the
    graph's own tensors (BatchNorm in train mode updates the copies)."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()

    params = {name: copy(p) for name, p in graph.module.named_parameters()}
    buffers = {name: copy(b) for name, b in graph.module.named_buffers()}
    return params, buffers


def functional_forward(graph: Graph, state: dict[str, torch.Tensor]) -> Callable[..., Any]:
    """``graph.module`` as a function of its inputs that computes with ``state`` (parameter and
    buffer tensors by name) in place of its own; works under ``torch.func.vmap``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(graph.module, state, args, kwargs)

    return forward


def cast_inputs(inputs: Any, dtype: torch.dtype | None) -> Any:
    """``inputs`` with floating tensors cast to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return inputs

    def cast(x: Any) -> Any:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return torch.utils._pytree.tree_map(cast, inputs)


@contextmanager
def dtype_hint(who: str, cast: torch.dtype | None) -> Iterator[None]:
    """Turn the dtype errors of a graph that bakes its dtype (``.to(float32)`` casts and dtype
    asserts that torch.export records, e.g. in GPT-2) into an error that says what to do."""
    try:
        yield
    except (RuntimeError, DataError) as e:  # a DataError of the batch's forward: its cause
        cause = e.__cause__ if isinstance(e, DataError) else e
        if cast is None or not isinstance(cause, RuntimeError) or "dtype" not in str(
                cause).lower():
            raise
        e = cause
        raise DataError(
            f"{who}: the graph fixes its dtype (torch.export recorded casts or dtype checks, "
            f"e.g. of attention masks), so it cannot run in {cast}: pass dtype=model. ({e})"
        ) from e
