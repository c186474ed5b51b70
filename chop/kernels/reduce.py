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
    tensors, bool, complex and float8 ones (no ``amax`` on CPU) take ``any``."""
    t = t.detach()
    if t.numel() == 0 or t.dtype == torch.bool or t.is_complex() or is_float8(t):
        return (t != 0).any(dims)
    return (t.amax(dims) != 0) | (t.amin(dims) != 0)


def has_nan(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN (False for an empty or non-floating-point tensor).

    ``amax`` propagates NaN, and as a vectorised reduction without a copy it is 6–9× faster on
    CPU than ``isnan(t).any()``, which first writes a bool copy of ``t`` (25M float32 entries:
    6 ms against 38 ms)."""
    if t.numel() == 0 or not t.is_floating_point():
        return False
    if is_float8(t):  # no amax for float8 on CPU
        return bool(torch.isnan(t.detach()).any())
    return bool(t.detach().amax().isnan())


def is_float8(t: torch.Tensor) -> bool:
    """Whether ``t`` holds one of torch's one-byte floats, which ``amax``/``amin`` reject."""
    return t.dtype.is_floating_point and t.dtype.itemsize == 1
