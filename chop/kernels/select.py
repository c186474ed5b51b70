"""Exact, memory-bounded top-k selection over a list of score tensors.

SNIP keeps the ``k`` largest saliency scores, either over all layers together
(global pruning) or per layer (local pruning, one call per tensor). The obvious
implementations do not scale: ``torch.quantile`` refuses inputs with more than
2**24 elements, and ``torch.kthvalue``/``torch.sort`` need one concatenated copy
of every score (and are slow on it).

This module instead performs a *radix selection* on the floats' bit patterns:

1. Each score is reinterpreted as a same-width integer (no copy). For IEEE
   floats, raw bit patterns order like the values within a sign, ascending for
   non-negative values and descending for negative ones, so no per-element key
   transform is needed: the bins of each histogram are simply visited in value
   order (non-negative patterns descending, then negative ones ascending).
2. Pass 1 histograms the top 16 bits of all entries (``torch.bincount``, one
   local histogram per chunk, summed) and finds the bin holding the k-th
   largest entry plus the count of entries strictly above that bin.
3. Each further pass histograms the next 16 bits of the entries in the chosen
   bin only: float32 needs 2 passes, float64 4, float16/bfloat16 1. Once the
   chosen bin holds at most ``_CHUNK`` entries they are gathered into one small
   tensor, so the remaining passes no longer rescan all scores.

Inputs of at most ``_SMALL`` entries in total use 8-bit digits instead (twice
the passes, but 256-bin histograms): that keeps every op small enough to run
single-threaded, which matters when local pruning calls this once per tensor.

The result is the exact threshold ``t`` and the number ``r`` of entries equal
to ``t`` that must be kept. Extra memory is O(one chunk + one histogram), never
a copy of all scores: tensors are streamed in chunks of ``_CHUNK`` elements
through reusable buffers (which also avoids the page-fault cost of fresh large
temporaries), and digits of small tensors are packed together so each
``bincount`` sees a full buffer. Every pass is "local histogram per chunk,
summed", so the small int64 histograms could be all-reduced across processes.
Masks are then ``score > t`` plus the first ``r`` entries ``== t``.

Ordering conventions: ties are broken by position (index of the tensor in the
list, then row-major flat index within it). ``-0.0`` and ``+0.0`` are treated as
*equal* (as ``==`` does), so they tie and are kept in position order. NaN cannot
be ranked and raises ``ValueError``. Tensors of different floating dtypes are
compared in their promoted dtype (an exact upcast).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Iterator, Sequence

import torch

_CHUNK = 1 << 22  # elements streamed at a time; 2**22 measured fastest on CPU
_SMALL = 1 << 15  # up to this many entries, use 8-bit digits (torch's parallel grain size)
# dtype -> (same-width integer dtype, bit width, top 16 bits of +inf)
_LAYOUT = {
    torch.float16: (torch.int16, 16, 0x7C00),
    torch.bfloat16: (torch.int16, 16, 0x7F80),
    torch.float32: (torch.int32, 32, 0x7F80),
    torch.float64: (torch.int64, 64, 0x7FF0),
}
# Per grid side: orders visiting the rows / columns of a histogram viewed as a
# square grid (top digit: non-negative rows descending, then negative ascending).
_ORDERS = {
    side: (torch.cat([torch.arange(side // 2 - 1, -1, -1), torch.arange(side // 2, side)]),
           torch.arange(side - 1, -1, -1), torch.arange(side))
    for side in (16, 256)
}


def kept_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries a sparsity keeps: round((1 − sparsity)·numel), halves up."""
    return min(numel, math.floor((1.0 - sparsity) * numel + 0.5))


def keep_masks(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks keeping exactly the ``k`` largest scores over all tensors.

    Args:
        scores: Floating-point score tensors (any shapes, no NaN).
        k: Number of entries to keep in total, ``0 <= k <= total numel``.

    Returns:
        Contiguous bool tensors shaped like ``scores``; exactly ``k`` entries are
        True. Among entries equal to the threshold, those first in (tensor index,
        row-major index) order are kept.

    Raises:
        ValueError: If ``k`` is out of range or any score is NaN.
        TypeError: If a tensor is not floating point.
    """
    total = _validate(scores, k)
    if k in (0, total):
        _raise_if_nan(scores)
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in scores]
    dtype = _common_dtype(scores)
    t, ties, n_eq = _select(scores, k, dtype)
    all_ties = ties == n_eq
    masks = []
    for s in scores:
        mask = torch.empty(s.numel(), dtype=torch.bool, device=s.device)
        for start, c in _float_chunks(s, dtype):
            m = mask[start : start + c.numel()]
            if all_ties:
                torch.ge(c, t, out=m)
                continue
            torch.gt(c, t, out=m)
            if ties:
                eq = c == t
                n = int(torch.count_nonzero(eq))
                if n > ties:  # the quota runs out inside this chunk
                    eq &= eq.cumsum(0, dtype=torch.int32) <= ties
                m |= eq
                ties -= min(n, ties)
        masks.append(mask.view(s.shape))
    return masks


def kth_largest(scores: Sequence[torch.Tensor], k: int) -> tuple[float, int]:
    """Exact threshold for keeping the ``k`` largest scores over all tensors.

    Args:
        scores: Floating-point score tensors (any shapes, no NaN).
        k: Number of entries to keep in total, ``0 <= k <= total numel``.

    Returns:
        ``(t, r)``: the k-th largest value ``t`` and the number ``r >= 1`` of
        entries equal to ``t`` that are kept; all entries ``> t`` are kept, plus
        the first ``r`` entries ``== t`` in (tensor, row-major) order. For
        ``k == 0`` returns ``(inf, 0)``. ``t`` is a Python float (exact for
        every supported dtype); a zero threshold is returned as ``0.0``.

    Raises:
        ValueError: If ``k`` is out of range or any score is NaN.
        TypeError: If a tensor is not floating point.
    """
    _validate(scores, k)
    if k == 0:
        _raise_if_nan(scores)
        return float("inf"), 0
    t, ties, _ = _select(scores, k, _common_dtype(scores))
    return t, ties


def _select(scores: Sequence[torch.Tensor], k: int, dtype: torch.dtype) -> tuple[float, int, int | None]:
    """Radix selection; returns ``(t, r, n_eq)`` with n_eq = #entries == t if known."""
    int_dtype, width, inf_top = _LAYOUT[dtype]
    total = sum(s.numel() for s in scores)
    bits = 8 if total <= _SMALL else 16
    scratch = _Scratch(int_dtype, min(_CHUNK, total), bits)

    cands: list[torch.Tensor] | None = None  # the remaining candidates, once gathered

    def pieces() -> Iterable[torch.Tensor]:
        if cands is not None:
            return cands
        return (c.view(int_dtype) for s in scores for _, c in _float_chunks(s, dtype))

    key, above, match = 0, 0, None  # key: unsigned bits chosen so far
    for shift in range(width - bits, -1, -bits):
        for c in pieces():
            scratch.add_digits(c if match is None else scratch.matching(c, *match), shift)
        hist = scratch.histogram()
        top = shift == width - bits
        if top:  # bins at or above +inf's (either sign) may hold NaN: then check exactly
            inf, sign = inf_top >> (16 - bits), 1 << (bits - 1)
            if int(hist[inf:sign].sum() + hist[sign | inf :].sum()):
                _raise_if_nan(scores)
        negative = not top and bool(key >> (width - shift - bits - 1))  # sign bit of the key so far
        digit, n_bin, n_above = _pick(hist, k - above, top, negative)
        above += n_above
        key = key << bits | digit
        match = (shift, _signed(key, width - shift))  # entries whose bits >= shift equal key
        if shift and n_bin <= _CHUNK:  # few enough: gather them rather than rescan everything
            device = scores[0].device
            cands = [torch.cat([scratch.matching(c, *match).to(device) for c in pieces()])]
            match = None
    t = torch.tensor(_signed(key, width), dtype=int_dtype).view(dtype).item()
    if key == 1 << (width - 1):  # -0.0 ties with +0.0, which the keys ranked above it
        above = sum(int(torch.count_nonzero(c > 0)) for s in scores for _, c in _float_chunks(s, dtype))
    return (0.0 if t == 0 else t), k - above, (None if t == 0 else n_bin)


def _pick(hist: torch.Tensor, k: int, top: bool, negative: bool) -> tuple[int, int, int]:
    """Finds the digit whose bin holds the k-th largest entry of a histogram.

    Bins are visited in descending value order: for the sign-carrying ``top``
    digit, non-negative patterns descending then negative ones ascending; for
    lower digits, descending if the key is non-negative, else ascending. The
    search runs on a square view (row sums, then one row), keeping the ops tiny.
    Returns ``(digit, entries in its bin, entries above it)``.
    """
    side = 16 if hist.numel() == 256 else 256
    top_rows, desc, asc = _ORDERS[side]
    grid = hist.view(side, side)
    row, above = _find(grid.sum(1), top_rows if top else asc if negative else desc, k)
    col, above_in_row = _find(grid[row], asc if negative or (top and row >= side // 2) else desc, k - above)
    return row * side + col, int(grid[row, col]), above + above_in_row


def _find(counts: torch.Tensor, order: torch.Tensor, k: int) -> tuple[int, int]:
    """First index in ``order`` where the running count reaches ``k``, and the count before it."""
    cum = counts[order].cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor(k)))
    index = int(order[j])
    return index, int(cum[j]) - int(counts[index])


class _Scratch:
    """Reusable per-device buffers of at most ``_CHUNK`` elements.

    Digits of consecutive pieces are packed into one buffer and histogrammed when
    it is full, so many small tensors cost one ``bincount`` instead of one each.
    """

    def __init__(self, int_dtype: torch.dtype, size: int, bits: int) -> None:
        self._dtype, self._size, self._bits = int_dtype, size, bits
        self._bufs: dict[torch.device, list] = {}
        self._hist: torch.Tensor | None = None

    def _get(self, device: torch.device) -> list:
        if device not in self._bufs:  # [digits, fill, shifted bits, match mask]
            empty = functools.partial(torch.empty, self._size, device=device)
            digits, bits, mask = empty(dtype=torch.int32), empty(dtype=self._dtype), empty(dtype=torch.bool)
            self._bufs[device] = [digits, 0, bits, mask]
        return self._bufs[device]

    def matching(self, c: torch.Tensor, shift: int, prefix: int) -> torch.Tensor:
        """Entries of ``c`` whose arithmetically shifted bits ``>> shift`` equal ``prefix``."""
        _, _, bits, mask = self._get(c.device)
        bits, mask = bits[: c.numel()], mask[: c.numel()]
        torch.bitwise_right_shift(c, shift, out=bits)
        torch.eq(bits, prefix, out=mask)
        return c[mask]

    def add_digits(self, c: torch.Tensor, shift: int) -> None:
        """Appends the digits ``(c >> shift) & (2**bits - 1)`` to the local histogram."""
        buf = self._get(c.device)
        if buf[1] + c.numel() > self._size:
            self._flush(buf)
        d = buf[0][buf[1] : buf[1] + c.numel()]
        if shift:  # an int32 ``d`` keeps the low bits of int64 ``c``, which is all we need
            torch.bitwise_right_shift(c, shift, out=d)
        else:
            d.copy_(c)
        buf[1] += c.numel()

    def _flush(self, buf: list) -> None:
        if buf[1]:
            d = buf[0][: buf[1]]
            d &= (1 << self._bits) - 1
            local = torch.bincount(d, minlength=1 << self._bits).cpu()
            self._hist = local if self._hist is None else self._hist + local
            buf[1] = 0

    def histogram(self) -> torch.Tensor:
        """Flushes and returns the summed histogram (CPU, int64), resetting it."""
        for buf in self._bufs.values():
            self._flush(buf)
        hist, self._hist = self._hist, None
        return hist


def _float_chunks(s: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(offset, chunk)`` over the row-major flattening of ``s``, cast to ``dtype``."""
    flat = s.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start : start + _CHUNK].to(dtype)


def _signed(value: int, bits: int) -> int:
    """Two's-complement reading of an unsigned ``bits``-bit integer."""
    return value - (1 << bits) if value >> (bits - 1) else value


def _common_dtype(scores: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = scores[0].dtype
    for s in scores[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return dtype if dtype in _LAYOUT else torch.float32  # e.g. float8 upcasts exactly


def _validate(scores: Sequence[torch.Tensor], k: int) -> int:
    for s in scores:
        if not s.is_floating_point():
            raise TypeError(f"scores must be floating-point tensors, got {s.dtype}")
    total = sum(s.numel() for s in scores)
    k = operator.index(k)
    if not 0 <= k <= total:
        raise ValueError(f"k must satisfy 0 <= k <= {total} (the total number of scores), got k={k}")
    return total


def _raise_if_nan(scores: Sequence[torch.Tensor]) -> None:
    if any(bool(torch.isnan(s).any()) for s in scores):
        raise ValueError("NaN scores cannot be ranked; replace or remove NaN values before selecting")
