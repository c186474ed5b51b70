"""Reductions torch has, made fast where its CPU kernel is slow."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def any_nonzero(t: torch.Tensor, dims: int | Sequence[int]) -> torch.Tensor:
    """``(t != 0).any(dims)``: for each index of the other dims, whether an entry along ``dims``
    is nonzero (NaN counts as nonzero; -0.0 does not).

    On CPU ``any`` is not vectorised and ``t != 0`` first writes a bool copy of ``t``; the
    largest and the smallest entry of a slice are both 0 exactly when every entry is, and
    ``amax``/``amin`` are vectorised reductions without a copy, several times faster. Empty
    tensors, bool and complex ones take ``any``."""
    t = t.detach()
    if t.numel() == 0 or t.dtype == torch.bool or t.is_complex():
        return (t != 0).any(dims)
    return (t.amax(dims) != 0) | (t.amin(dims) != 0)


def has_nan(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN (False for an empty or non-floating-point tensor).

    ``amax`` propagates NaN, and as a vectorised reduction without a copy it is 6–9× faster on
    CPU than ``isnan(t).any()``, which first writes a bool copy of ``t`` (25M float32 entries:
    6 ms against 38 ms)."""
    if t.numel() == 0 or not t.is_floating_point():
        return False
    return bool(t.detach().amax().isnan())
