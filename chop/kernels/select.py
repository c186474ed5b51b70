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
Below ``_DIRECT`` entries on one process, the fixed cost of those passes is more
than the work: such inputs are concatenated (a small copy) and the threshold and
its counts read from one sort of it (:func:`_direct_threshold`), with the same
threshold, tie order and masks. On CPU, from ``_PARTITIONED`` entries, the
threshold is cut in linear time instead (:func:`_cut`), from a sorted sample of
``_TIES`` entries: a value that fills a tenth of the sample (the zeros of pruned
weights) is counted, and is the threshold when its entries hold the threshold's
rank (where a Pruner's threshold often lies); else the sample brackets the rank, as
below, and the few values in the bracket (the block left out) are cut the same way.
Comparisons and counts are most of the work: ``np.partition`` slows by up to 20× near
a block of equal values, and takes 30 times a comparison per value on some machines.

Larger inputs on one process first try a **bracket** (:func:`_bracket`, after
Floyd and Rivest): the k-th largest of a strided sample of ``_SAMPLE`` entries,
widened by four standard deviations of a sample quantile on each side, gives two
values ``lo <= hi``; one pass counts the entries above ``hi`` and gathers those
in ``(lo, hi]``, and when the k-th largest is among them (the counts say so
exactly) one sort of the gathered few finds it. That is one pass
over the scores instead of the radix selection's two; a threshold equal to ``lo`` (a
block of equal scores, such as the zeros of pruned weights) takes one more, which counts
the entries equal to it. When the counts say the
bracket missed, or it would gather more than ``_CHUNK`` entries (many equal
scores), the radix selection runs as above: the result is the same either way.

The result is the exact threshold ``t`` and the number ``r`` of entries equal
to ``t`` that must be kept. Extra memory is O(one chunk + one histogram), never
a copy of all scores: tensors are streamed in chunks of ``_CHUNK`` elements
through reusable buffers (which also avoids the page-fault cost of fresh large
temporaries), and digits of small tensors are packed together so each
``bincount`` sees a full buffer. Masks are then ``score > t`` plus the first
``r`` entries ``== t``.

On CPU the comparisons and counts of the direct path, and of the bracket and the
masks when torch runs on few threads (:func:`numpy_compares`), are numpy's on the
same memory: its single-threaded loop beats torch's comparison into bool there
(``benchmarks/bench_select.py --masks`` prints both).

Ordering conventions: ties are broken by position (index of the tensor in the
list, then row-major flat index within it). ``-0.0`` and ``+0.0`` are treated as
*equal* (as ``==`` does), so they tie and are kept in position order. NaN cannot
be ranked and raises ``ValueError``. Tensors of different floating dtypes are
compared in their promoted dtype (an exact upcast).

**Across processes.** Every pass is "local histogram per chunk, summed", so the
same selection runs on scores that no process holds whole: each process passes
its :class:`Piece` of every tensor (its box of the whole tensor: local scores,
the whole shape, the box's offset) and a ``reduce`` callable that sums an int64
vector over the processes (:func:`chop.kernels.distributed.count_reducer`).
Each pass all-reduces its histogram (and the NaN and zero counts), so every
process finds the same ``(t, r)``. Ties must still be broken in the *whole*
(tensor, row-major) order, which interleaves the boxes (a column-sharded weight
alternates between processes row by row), so with pieces the first ``r`` ties
are found by a second exact selection: the ``r`` smallest global positions
among the entries ``== t`` (positions as float64, exact below 2**53), giving a
cut position ``p``. Masks are ``score > t`` or (``score == t`` and position
``<= p``): a function of the entry alone, so copies of a piece (``counted=False``,
e.g. replicated placements) get the same mask as the one that is counted. The
masks are bit-identical to one process selecting over the whole tensors.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import torch

_CHUNK = 1 << 22  # elements streamed at a time; 2**22 measured fastest on CPU
_SMALL = 1 << 15  # up to this many entries, use 8-bit digits (torch's parallel grain size)
_DIRECT = 1 << 19  # below this many entries (no pieces), one cut of a copy is faster
_SAMPLE = 1 << 15  # entries sampled to bracket the threshold of a larger selection
_PARTITIONED = 1 << 11  # from this many entries a direct selection cuts in linear time (_cut):
# below it one sort is as fast (bench_select.py --cuts)
_TIES = 1 << 9  # entries sampled to look for a large block of equal scores (_block_value)
_SIDE = 8  # a cut copies a block's side holding the threshold when it is under 1/_SIDE of all
_GOLDEN = np.arange(1, _TIES + 1) * ((5**0.5 - 1) / 2) % 1  # where, as fractions of the length
_NUMPY_THREADS = 2  # up to this many torch threads, bool work runs in numpy (numpy_compares)
_PIECE = 1 << 16  # entries numpy compares at a time in a bracket's band scan (_band_by_numpy)
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


Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums an int64 CPU vector over processes


@dataclass(frozen=True)
class Piece:
    """One process's box of a score tensor that is split over processes.

    ``local`` holds the scores of the entries ``offset[d] <= i_d < offset[d] + local.shape[d]``
    of a tensor of ``shape``. ``counted=False`` marks a copy of a box that another process
    counts (a replicated placement): it gets its mask but adds nothing to the counts.
    """

    local: torch.Tensor
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    counted: bool = True

    @property
    def numel(self) -> int:
        """Entries of the whole tensor."""
        return math.prod(self.shape)


def whole_numel(score: torch.Tensor | Piece) -> int:
    """Entries of the whole tensor a score (or a :class:`Piece` of one) stands for."""
    return score.numel if isinstance(score, Piece) else score.numel()


def mask_counts(
    masks: Sequence[torch.Tensor], scores: Sequence[torch.Tensor | Piece], *,
    reduce: Reduce | None = None,
) -> list[int]:
    """Kept entries of each whole tensor: the masks' True counts, summed over processes with
    ``reduce`` (copies, ``counted=False``, count nothing)."""
    counted = [not isinstance(s, Piece) or s.counted for s in scores]
    counts = iter(true_counts([m for m, c in zip(masks, counted, strict=True) if c]))
    return _summed([next(counts) if c else 0 for c in counted], reduce)


def true_counts(masks: Sequence[torch.Tensor]) -> list[int]:
    """The True entries of each bool tensor: counted by numpy where :func:`numpy_compares`,
    else by torch and read back in one sync."""
    if not masks or numpy_compares(*masks):
        return [int(np.count_nonzero(m.numpy())) for m in masks]
    return torch.stack([torch.count_nonzero(m) for m in masks]).tolist()


def part_counts(flat: torch.Tensor, sizes: Sequence[int]) -> list[int]:
    """:func:`true_counts` of the consecutive parts of the flat bool tensor ``flat``, of
    ``sizes`` entries each (what :func:`keep_masks_and_flat` returns unsplit)."""
    if not numpy_compares(flat):
        return true_counts(flat.split(list(sizes)))
    values = flat.numpy()
    return [int(np.count_nonzero(values[start:start + n]))
            for start, n in zip(itertools.accumulate(sizes, initial=0), sizes)]


def numpy_compares(*tensors: torch.Tensor) -> bool:
    """Whether bool work on ``tensors`` (comparisons into bool, counts) goes to numpy: for
    plain CPU tensors (no subclass) while torch runs on at most ``_NUMPY_THREADS`` threads.
    numpy's loop is one thread and several times faster than torch's per thread; torch's runs
    on all of them, so with many threads it wins (``benchmarks/bench_select.py --masks``
    times both at the current thread count)."""
    return torch.get_num_threads() <= _NUMPY_THREADS and all(
        type(t) is torch.Tensor and t.is_cpu for t in tensors)


def kept_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries a sparsity keeps: round((1 − sparsity)·numel), halves up,
    with ``sparsity`` taken as the decimal it is written as (in floats 1 − 0.9995 is a hair
    under 0.0005, which rounded 0.5 of 1,000 entries down to 0)."""
    num, den = _decimal(float(sparsity))
    return min(numel, (2 * (den - num) * numel + den) // (2 * den))


@functools.lru_cache(maxsize=256)
def _decimal(value: float) -> tuple[int, int]:
    """``value`` as the fraction of the shortest decimal that gives it (0.9995: 9995/10000)."""
    return Decimal(repr(value)).as_integer_ratio()  # in lowest terms, as Fraction's


def keep_masks(
    scores: Sequence[torch.Tensor | Piece], k: int, *, reduce: Reduce | None = None
) -> list[torch.Tensor]:
    """Boolean masks keeping exactly the ``k`` largest scores over all tensors.

    Args:
        scores: Floating-point score tensors (any shapes, no NaN), or this process's
            :class:`Piece` of each (every process passes the same tensors in the same order).
        k: Number of entries to keep in total, ``0 <= k <= total numel`` (of the whole tensors).
        reduce: With pieces spread over processes: sums an int64 vector over them (see the
            module doc); None when this process holds every piece.

    Returns:
        Contiguous bool tensors shaped like ``scores`` (like each piece's ``local``); exactly
        ``k`` entries of the whole tensors are True. Among entries equal to the threshold,
        those first in (tensor index, row-major index of the whole tensor) order are kept.

    Raises:
        ValueError: If ``k`` is out of range or any score is NaN.
        TypeError: If a tensor is not floating point.
    """
    total, k = _validate(scores, k)
    locals_, counted = _locals(scores)
    if k in (0, total):
        _raise_if_nan(counted, reduce)
        return [torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device) for s in locals_]
    dtype = _common_dtype(locals_)
    if _direct(scores, total, reduce):
        return split_flat(_direct_flat(counted, k, dtype), [s.shape for s in counted])
    pieces = _pieces(scores)
    t, ties, n_eq = _threshold(scores, counted, total, k, dtype, reduce)
    all_ties = ties == n_eq
    bases = list(itertools.accumulate((p.numel for p in pieces), initial=0))
    cut = None  # with pieces: the last kept position among the ties
    if not all_ties and any(isinstance(s, Piece) for s in scores):
        cut = _tie_cut(pieces, bases, t, ties, dtype, reduce)
    masks = []
    for p, base in zip(pieces, bases):
        mask = torch.empty(p.local.numel(), dtype=torch.bool, device=p.local.device)
        in_numpy = cut is None and _numpy_reads(p.local, dtype)
        for start, c in _float_chunks(p.local, dtype):
            m = mask[start : start + c.numel()]
            if in_numpy:  # the same, compared by numpy (faster on CPU)
                ties -= _kept_by_numpy(c.numpy(), t, None if all_ties else ties, m.numpy())
                continue
            if all_ties:
                torch.ge(c, t, out=m)
                continue
            torch.gt(c, t, out=m)
            eq = c == t
            if cut is not None:
                index = eq.nonzero().squeeze(1)
                eq[index[_positions(p, base, index + start) > cut]] = False
            elif ties:
                n = int(torch.count_nonzero(eq))
                if n > ties:  # the quota runs out inside this chunk
                    eq &= eq.cumsum(0, dtype=torch.int32) <= ties
                ties -= min(n, ties)
            else:
                continue
            m |= eq
        masks.append(mask.view(p.local.shape))
    return masks


def keep_masks_and_flat(scores: Sequence[torch.Tensor], k: int, *, split: bool = True
                        ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """:func:`keep_masks` of plain tensors on one process, and, when the selection ran on one
    flat copy of all the scores (fewer than ``_DIRECT`` entries: a small model), the same
    masks as one flat bool tensor in the scores' order (else None; over the same memory on
    CPU): a caller that reads every mask at once, as a Pruner's step does, reads that one.
    With ``split`` False, when there is that flat tensor the masks are not made (None;
    :func:`split_flat` makes them): on a small model making them costs as much as the sort."""
    total, k = _validate(scores, k)
    if 0 < k < total and _direct(scores, total, None):
        flat = _direct_flat(list(scores), k, _common_dtype(scores))
        return (split_flat(flat, [s.shape for s in scores]) if split else None), flat
    return keep_masks(scores, k), None


def kth_largest(
    scores: Sequence[torch.Tensor | Piece], k: int, *, reduce: Reduce | None = None
) -> tuple[float, int]:
    """Exact threshold for keeping the ``k`` largest scores over all tensors.

    Args:
        scores, k, reduce: as for :func:`keep_masks`.

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
    total, k = _validate(scores, k)
    locals_, counted = _locals(scores)
    if k == 0:
        _raise_if_nan(counted, reduce)
        return float("inf"), 0
    dtype = _common_dtype(locals_)
    if _direct(scores, total, reduce):
        _, t, above, _ = _direct_threshold(counted, k, dtype)
        return (0.0 if t == 0 else t), k - above
    t, ties, _ = _threshold(scores, counted, total, k, dtype, reduce)
    return t, ties


def _threshold(
    scores: Sequence[torch.Tensor | Piece], counted: list[torch.Tensor], total: int, k: int,
    dtype: torch.dtype, reduce: Reduce | None,
) -> tuple[float, int, int | None]:
    """``(t, r, n_eq)`` as :func:`_select` returns them: by :func:`_bracket` when every score is
    on this process (and one device) and the bracket holds the threshold, else by the radix
    selection."""
    chunks = _chunks_of(counted, dtype)
    if (reduce is None and not any(isinstance(s, Piece) for s in scores)
            and len({s.device for s in counted}) == 1):
        found = _bracket(chunks, total, k, dtype)
        if found is not None:
            return found
    return _select(chunks, total, k, dtype, reduce)


def _bracket(chunks: Callable[[], Iterable[torch.Tensor]], total: int, k: int,
             dtype: torch.dtype) -> tuple[float, int, int] | None:
    """The threshold of keeping the ``k`` largest of the ``total`` entries ``chunks()`` yields,
    found in a bracket from a sample (see the module doc); None when the bracket does not hold
    it or would gather more than ``_CHUNK`` entries. Raises on NaN like :func:`_select`."""
    step = max(1, total // _SAMPLE)
    sample = torch.cat([c[(step // 2) % c.numel()::step] for c in chunks()])
    # the sample entries of ranks top and bottom (1 = the largest) bracket the threshold
    q, m = k / total, sample.numel()
    spread = 4.0 * math.sqrt(m * q * (1.0 - q)) + 4.0
    top, bottom = math.floor(q * m - spread), math.ceil(q * m + spread)
    ranked = _rankable(sample)
    hi, lo = _kth_smallest(ranked, min(m - top + 1, m), max(m - bottom + 1, 1))
    hi, lo = (hi if top >= 1 else math.inf), (lo if bottom <= m else -math.inf)
    found = (_band_by_numpy(chunks, hi, lo) if _numpy_reads(sample, dtype)
             else _band_by_torch(chunks, hi, lo, min(_CHUNK, total)))
    if found is None:
        return None
    n_above, band = found
    over_lo = n_above + band.numel()
    if k > over_lo:  # the threshold may be lo itself (a block's value): count its entries
        equal = sum(int(torch.count_nonzero(c == lo)) for c in chunks()) if lo > -math.inf else 0
        return (0.0 if lo == 0 else lo, k - over_lo, equal) if k <= over_lo + equal else None
    if not n_above < k:
        return None
    wanted = k - n_above  # the wanted-th largest of the band
    _, t, n_over, at_least = _direct_threshold([band], wanted, dtype)
    return (0.0 if t == 0 else t), wanted - n_over, at_least - n_over


def _band_by_torch(chunks: Callable[[], Iterable[torch.Tensor]], hi: float, lo: float,
                   size: int) -> tuple[int, torch.Tensor] | None:
    """One pass over ``chunks()`` (each at most ``size`` entries): how many entries are above
    ``hi``, and those in (lo, hi]; None when more than ``_CHUNK`` are. Raises on NaN.

    ``lo`` is left out: progressive pruning asks, step after step, for a threshold just above
    the pruned weights' scores (all 0 for magnitude), where a sample's ``lo`` is that very
    value, and gathering every pruned weight would fail the bracket. When the threshold is
    ``lo`` itself, :func:`_bracket` counts the entries equal to it in one more pass."""
    above, sums, band, gathered, device = [], [], [], 0, None
    for c in chunks():
        if device is None:
            device = c.device
            buffers = torch.empty(2, size, dtype=torch.bool, device=device)
        over, inside = buffers[:, : c.numel()]  # reused: no fresh pages for each chunk
        torch.gt(c, hi, out=over)
        torch.gt(c, lo, out=inside)
        inside ^= over  # lo < c <= hi (lo <= hi: what is over hi is over lo)
        above.append(torch.count_nonzero(over))
        sums.append(c.sum().double())  # NaN if a score is (or when +inf meets -inf)
        gathered += int(torch.count_nonzero(inside))
        if gathered > _CHUNK:  # many equal scores: the radix passes, in bounded memory
            return None
        band.append(c[inside])
    n_above, nan = torch.stack([torch.stack(above).sum().double(), sum(sums)]).tolist()
    if math.isnan(nan):
        _raise_if_nan(chunks(), None)
    return int(n_above), torch.cat(band)


def _band_by_numpy(chunks: Callable[[], Iterable[torch.Tensor]], hi: float, lo: float
                   ) -> tuple[int, torch.Tensor] | None:
    """:func:`_band_by_torch` for CPU chunks numpy reads, compared and counted by numpy, in
    pieces of ``_PIECE`` entries, whose temporaries stay in cache (1.1-1.6x faster than whole
    chunks of 2**20-2**22 entries)."""
    over_buffer, inside_buffer = np.empty(_PIECE, dtype=bool), np.empty(_PIECE, dtype=bool)
    above, band, gathered, nan = 0, [], 0, False
    for c in chunks():
        whole = c.numpy()
        for start in range(0, whole.size, _PIECE):
            a = whole[start:start + _PIECE]
            over, inside = over_buffer[: a.size], inside_buffer[: a.size]
            np.greater(a, hi, out=over)
            np.greater(a, lo, out=inside)
            np.bitwise_xor(inside, over, out=inside)  # lo < a <= hi
            above += int(np.count_nonzero(over))
            nan = nan or bool(np.isnan(a.max()))  # max is NaN if an entry is
            band.append(a[inside])
            gathered += band[-1].size
            if gathered > _CHUNK:  # many equal scores: the radix passes, in bounded memory
                return None
    if nan:
        _raise_if_nan(chunks(), None)
    return above, torch.from_numpy(np.concatenate(band))


def _kept_by_numpy(scores: np.ndarray, t: float, ties: int | None, out: np.ndarray) -> int:
    """``out`` = scores above ``t`` and the first ``ties`` equal to it (every one with
    ``ties=None``); returns how many equal ones it kept (0 with ``ties=None``)."""
    if ties is None:
        np.greater_equal(scores, t, out=out)
        return 0
    np.greater(scores, t, out=out)
    if not ties:
        return 0
    first = np.flatnonzero(scores == t)[:ties]
    out[first] = True
    return first.size


def _numpy_reads(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a large selection's chunks of ``dtype`` on ``tensor``'s device are compared by
    numpy (:func:`numpy_compares`, and a float dtype numpy has: not bfloat16)."""
    return numpy_compares(tensor) and dtype in (torch.float16, torch.float32, torch.float64)


def _kth_smallest(values: torch.Tensor, *ranks: int) -> list[float]:
    """The ``j``-th smallest (1-based) of the 1-D float32/float64 ``values`` for each ``j`` in
    ``ranks`` (exact as Python floats).

    On CPU from one ``np.sort`` of a copy: ``torch.kthvalue`` on CPU also moves an int64 index
    per entry, and ``np.partition`` (introselect) degrades by 10-20× when many scores are equal,
    as pruned weights are; ``np.sort`` does neither (``benchmarks/bench_select.py`` prints it
    side by side with ``torch.kthvalue``). Elsewhere by ``torch.kthvalue``."""
    if values.device.type != "cpu":
        return torch.stack([torch.kthvalue(values, j).values for j in ranks]).tolist()
    ordered = np.sort(values.detach().numpy())
    return [ordered[j - 1].item() for j in ranks]


def _rankable(values: torch.Tensor) -> torch.Tensor:
    """``values`` in a dtype :func:`_kth_smallest` ranks on every device: float16/bfloat16
    upcast to float32, which is exact."""
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def _direct(scores: Sequence[torch.Tensor | Piece], total: int, reduce: Reduce | None) -> bool:
    """Whether to select from one sort of a copy (small, all on this process)."""
    return total < _DIRECT and reduce is None and not any(isinstance(s, Piece) for s in scores)


def _direct_threshold(scores: list[torch.Tensor], k: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, float, int, int]:
    """All scores as one flat tensor (in a dtype :func:`_rankable` keeps), the k-th largest
    ``t`` (``0 < k <= numel``), and how many scores are above ``t`` and at least ``t``.

    On CPU, from :func:`_cut`. Elsewhere ``torch.kthvalue``, then both counts and a NaN
    check in one read-back."""
    flat = _rankable(torch.cat([s.detach().reshape(-1).to(dtype)
                                if s.requires_grad or s.dtype != dtype else s.reshape(-1)
                                for s in scores]))
    j = flat.numel() - k  # 0-based rank of t from the smallest
    if flat.device.type == "cpu":
        return (flat, *_cut(flat.numpy(), j))
    t = torch.kthvalue(flat, j + 1).values
    # the sum is NaN when a score is (or when +inf and -inf meet: then the exact check passes)
    total, above, at_least = torch.stack([flat.sum().double(), torch.count_nonzero(flat > t),
                                          torch.count_nonzero(flat >= t)]).tolist()
    if math.isnan(total):
        _raise_if_nan([flat], None)
    return flat, t.item(), int(above), int(at_least)


def _sample(values: np.ndarray) -> np.ndarray:
    """``_TIES`` of ``values``, sorted. Their positions follow the golden ratio, not a stride:
    a stride that is a multiple of a weight's row length reads one column, and misses columns
    pruned to zero."""
    return np.sort(values[(_GOLDEN * values.size).astype(np.int64)])


def _block_value(sample: np.ndarray) -> float | None:
    """A value that may fill a tenth of the values the sorted ``sample`` was drawn from (it
    fills a tenth of the sample), or None."""
    width = sample.size // 10
    found = np.flatnonzero(sample[width:] == sample[:-width])  # NaN equals nothing
    return sample[found[0]].item() if found.size else None


def _cut(values: np.ndarray, j: int) -> tuple[float, int, int]:
    """:func:`_direct_threshold`'s ``t`` (the entry of 0-based rank ``j`` from the smallest),
    and how many of ``values`` are above it and at least it, in linear time and a few passes of
    comparisons (``bench_select.py --cuts`` prints it against the sort). Raises on NaN.

    - Below ``_PARTITIONED`` values, one ``np.sort``: ``t`` by index, the counts by binary
      search.
    - A block of equal values (:func:`_block_value` of a sorted sample) is counted in three
      comparisons: ``t`` is its value when rank ``j`` falls in it; else, when rank ``j``'s
      side of it holds under ``1/_SIDE`` of the values, ``t`` is cut from a copy of that side
      (:func:`_side`).
    - Else the sample brackets rank ``j`` (:func:`_banded`, the block left out) and ``t`` is
      cut from the values in the bracket, at most about a seventh of them; ``np.partition``
      of all of them (or a copy of the block's side) only when the bracket misses, or no
      bracket narrows them.

    ``np.partition`` is not the linear-time cut it could be: it slows by up to 20× near a block
    of equal values, and on some machines (AMD's with AVX-512) it takes 9 ns a value where a
    comparison takes 0.3."""
    n = values.size
    if n < _PARTITIONED:
        ordered = np.sort(values)
        if math.isnan(ordered[-1]):
            _raise_if_nan([torch.from_numpy(values)], None)
        t = ordered[j].item()
        if (j == 0 or ordered[j - 1] < t) and (j + 1 == n or ordered[j + 1] > t):
            return t, n - j - 1, n - j  # t is not tied: no search
        return (t, n - int(np.searchsorted(ordered, t, "right")),
                n - int(np.searchsorted(ordered, t, "left")))
    sample = _sample(values)
    block, floor, ceiling = _block_value(sample), None, None
    if block is not None:
        below = int(np.count_nonzero(values < block))
        equal = int(np.count_nonzero(values == block))
        above = int(np.count_nonzero(values > block))
        if below + equal + above < n:  # NaN compares False
            _raise_if_nan([torch.from_numpy(values)], None)
        if below <= j < below + equal:
            return block, above, above + equal
        upward = j >= below + equal
        if (above if upward else below) * _SIDE < n:  # few values on rank j's side: a copy
            return _side(values, j, block, upward, below + equal, equal + above)
        kind = values.dtype.type
        if upward:
            floor = np.nextafter(kind(block), kind(math.inf))  # the band starts above the block
        else:
            ceiling = np.nextafter(kind(block), kind(-math.inf))
    banded = _banded(values, j, sample, floor, ceiling)
    if banded is not None:
        return banded
    if block is None:
        return _partitioned(values, j)
    return _side(values, j, block, upward, below + equal, equal + above)  # missed (rarely)


def _side(values: np.ndarray, j: int, block: float, upward: bool, up_to: int, from_: int
          ) -> tuple[float, int, int]:
    """:func:`_cut` from a copy of the values on rank ``j``'s side of a block of equal values
    (above it when ``upward``): ``up_to`` values are at most the block's value, ``from_`` at
    least it."""
    if upward:
        return _cut(np.compress(values > block, values), j - up_to)
    t, over, at_least = _cut(np.compress(values < block, values), j)
    return t, over + from_, at_least + from_


def _banded(values: np.ndarray, j: int, sample: np.ndarray, floor: np.floating | None,
            ceiling: np.floating | None) -> tuple[float, int, int] | None:
    """:func:`_cut` from the values between two entries of the sorted ``sample`` that bracket
    rank ``j``: the entries three standard deviations of a sample's rank on either side of
    where rank ``j`` falls in it (no bound where that lies past an end of the sample), the
    bracket kept at or above ``floor`` and at or below ``ceiling`` (a block's neighbours: the
    band then leaves the block out). None when the bracket misses rank ``j``, or holds all
    the values."""
    s, n = sample.size, values.size
    i = (j + 0.5) * s / n  # where rank j falls in the sample
    margin = 3 * math.sqrt(i * (1 - i / s)) + 2
    first, last = math.floor(i - margin), math.floor(i + margin)
    lo = sample[first] if first >= 0 else None
    hi = sample[last] if last < s else None
    if floor is not None and (lo is None or lo < floor):
        lo = floor
    if ceiling is not None and (hi is None or hi > ceiling):
        hi = ceiling
    if lo is None and hi is None:
        return None
    lower = values < lo if lo is not None else np.zeros(n, dtype=bool)
    upper = values > hi if hi is not None else np.zeros(n, dtype=bool)
    below, above = int(np.count_nonzero(lower)), int(np.count_nonzero(upper))
    band = np.compress(~(lower | upper), values)  # NaN, which compares False, too
    if not below <= j < n - above or band.size == n:
        return None
    t, over, at_least = _cut(band, j - below)
    return t, over + above, at_least + above


def _partitioned(values: np.ndarray, j: int) -> tuple[float, int, int]:
    """:func:`_cut` by one ``np.partition`` and two counts."""
    parted = np.partition(values, j)
    t, head, tail = parted[j].item(), parted[:j], parted[j:]  # tail: t and all ranked above
    at_least = int(np.count_nonzero(tail >= t))
    if math.isnan(t) or at_least < tail.size:  # NaN compares False
        _raise_if_nan([torch.from_numpy(values)], None)
    if head.size and head.max() == t:  # ties of t ranked below it
        at_least += int(np.count_nonzero(head == t))
    return t, int(np.count_nonzero(tail > t)), at_least


def _direct_flat(scores: list[torch.Tensor], k: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`keep_masks` by :func:`_direct_threshold`, all masks as one flat bool tensor (in
    the scores' order; :func:`split_flat` cuts it): entries above the threshold and the first
    ties in position order. On CPU the comparisons run in numpy, faster than torch's
    comparisons into bool there (``bench_select.py --masks``)."""
    flat, t, above, at_least = _direct_threshold(scores, k, dtype)
    if flat.device.type == "cpu":
        values = flat.numpy()
        keep = values >= t
        if at_least > k:  # more ties at t than the budget takes: drop the last ones
            keep[np.flatnonzero(values == t)[k - above:]] = False
        return torch.from_numpy(keep)
    mask = flat >= t
    if at_least > k:
        eq = flat == t
        mask &= ~eq | (eq.cumsum(0, dtype=torch.int32) <= k - above)
    return mask


def split_flat(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """The masks of consecutive parts of the flat bool tensor ``flat``, one per shape, each on
    a storage of its own, as safetensors requires of tensors saved together (on CPU each wraps
    its own part of ``flat``'s memory; elsewhere each is a copy)."""
    sizes = [math.prod(shape) for shape in shapes]
    if flat.device.type == "cpu":
        keep = flat.numpy()
        bounds = itertools.accumulate(sizes, initial=0)
        return [torch.from_numpy(keep[start:start + n].reshape(shape))
                for start, n, shape in zip(bounds, sizes, shapes)]
    return [m.view(shape).clone() for m, shape in zip(flat.split(sizes), shapes)]


def _select(
    chunks: Callable[[], Iterable[torch.Tensor]], total: int, k: int, dtype: torch.dtype,
    reduce: Reduce | None,
) -> tuple[float, int, int | None]:
    """Radix selection over the float tensors ``chunks()`` yields (each at most ``_CHUNK``
    entries of ``dtype``; ``total``: an upper bound of their number over all processes, the
    same on each); returns ``(t, r, n_eq)`` with n_eq = #entries == t if known."""
    int_dtype, width, inf_top = _LAYOUT[dtype]
    bits = 8 if total <= _SMALL else 16
    scratch = _Scratch(int_dtype, min(_CHUNK, total), bits)

    cands: list[torch.Tensor] | None = None  # the remaining candidates, once gathered

    def pieces() -> Iterable[torch.Tensor]:
        if cands is not None:
            return cands
        return (c.view(int_dtype) for c in chunks())

    key, above, match = 0, 0, None  # key: unsigned bits chosen so far
    for shift in range(width - bits, -1, -bits):
        for c in pieces():
            scratch.add_digits(c if match is None else scratch.matching(c, *match), shift)
        hist = scratch.histogram()
        if reduce is not None:
            hist = reduce(hist)
        top = shift == width - bits
        if top:  # bins at or above +inf's (either sign) may hold NaN: then check exactly
            inf, sign = inf_top >> (16 - bits), 1 << (bits - 1)
            if int(hist[inf:sign].sum() + hist[sign | inf :].sum()):
                _raise_if_nan(chunks(), reduce)
        negative = not top and bool(key >> (width - shift - bits - 1))  # sign bit of the key so far
        digit, n_bin, n_above = _pick(hist, k - above, top, negative)
        above += n_above
        key = key << bits | digit
        match = (shift, _signed(key, width - shift))  # entries whose bits >= shift equal key
        if shift and n_bin <= _CHUNK:  # few enough: gather them rather than rescan everything
            found = [scratch.matching(c, *match) for c in pieces()]
            cands = [torch.cat([f.to(found[0].device) for f in found])] if found else []
            match = None
    t = torch.tensor(_signed(key, width), dtype=int_dtype).view(dtype).item()
    if key == 1 << (width - 1):  # -0.0 ties with +0.0, which the keys ranked above it
        (above,) = _summed([sum(int(torch.count_nonzero(c > 0)) for c in chunks())], reduce)
    return (0.0 if t == 0 else t), k - above, (None if t == 0 else n_bin)


def _tie_cut(
    pieces: list[Piece], bases: list[int], t: float, ties: int, dtype: torch.dtype,
    reduce: Reduce | None,
) -> int:
    """The position of the ``ties``-th entry equal to ``t`` in the whole (tensor, row-major)
    order: an exact selection of the ``ties`` largest ``total − position`` (float64, exact)."""
    total = bases[-1]
    if total >= 1 << 53:
        raise ValueError(f"cannot order {total} scores by position exactly (at most 2**53)")

    def chunks() -> Iterator[torch.Tensor]:
        for p, base in zip(pieces, bases):
            if p.counted:
                for start, c in _float_chunks(p.local, dtype):
                    index = (c == t).nonzero().squeeze(1)
                    if index.numel():
                        yield (total - _positions(p, base, index + start)).to(torch.float64)

    value, _, _ = _select(chunks, total, ties, torch.float64, reduce)
    return total - int(value)


def _positions(p: Piece, base: int, index: torch.Tensor) -> torch.Tensor:
    """Positions in the whole order (``base``: the entries of the tensors before) of the local
    row-major indices ``index`` of piece ``p``."""
    strides = [math.prod(p.shape[d + 1 :]) for d in range(len(p.shape))]
    start = base + sum(o * s for o, s in zip(p.offset, strides))
    local = p.local.shape
    if tuple(local[1:]) == tuple(p.shape[1:]):  # whole rows: one contiguous run
        return index + start
    out = torch.full_like(index, start)
    for d in reversed(range(len(local))):
        out += index % local[d] * strides[d]
        index = index // local[d]
    return out


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
        return torch.zeros(1 << self._bits, dtype=torch.int64) if hist is None else hist


def _float_chunks(s: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(offset, chunk)`` over the row-major flattening of ``s``, cast to ``dtype``."""
    flat = s.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start : start + _CHUNK].to(dtype)


def _chunks_of(
    tensors: list[torch.Tensor], dtype: torch.dtype
) -> Callable[[], Iterator[torch.Tensor]]:
    """The chunks of ``tensors`` in ``dtype``, as a function that streams them again each call."""
    return lambda: (c for s in tensors for _, c in _float_chunks(s, dtype))


def _pieces(scores: Sequence[torch.Tensor | Piece]) -> list[Piece]:
    return [s if isinstance(s, Piece) else Piece(s, tuple(s.shape), (0,) * s.dim())
            for s in scores]


def _summed(counts: list[int], reduce: Reduce | None) -> list[int]:
    """``counts`` summed over the processes (unchanged without ``reduce``)."""
    if reduce is None:
        return counts
    return reduce(torch.tensor(counts, dtype=torch.int64)).tolist()


def _signed(value: int, bits: int) -> int:
    """Two's-complement reading of an unsigned ``bits``-bit integer."""
    return value - (1 << bits) if value >> (bits - 1) else value


def _common_dtype(scores: Sequence[torch.Tensor]) -> torch.dtype:
    """The scores' promoted dtype; one without a rankable layout (float8, which torch does not
    promote with any other dtype) counts as float32, to which it upcasts exactly."""
    dtypes = [s.dtype if s.dtype in _LAYOUT else torch.float32 for s in scores]
    return functools.reduce(torch.promote_types, dtypes)


def _validate(scores: Sequence[torch.Tensor | Piece], k: int) -> tuple[int, int]:
    """The total entries of the whole tensors and ``k`` as an int (given as any integer, e.g.
    numpy's or a 0-dim tensor), after checking the scores' dtypes, that each piece fits in its
    tensor, and that ``0 <= k <= total``."""
    total = 0
    for s in scores:
        local = s.local if isinstance(s, Piece) else s
        if not local.is_floating_point():
            raise TypeError(f"scores must be floating-point tensors, got {local.dtype}")
        if not isinstance(s, Piece):
            total += s.numel()
            continue
        if len(s.offset) != len(s.shape) or local.dim() != len(s.shape) or any(
            o < 0 or o + n > size for o, n, size in zip(s.offset, local.shape, s.shape)
        ):
            raise ValueError(f"a piece of shape {tuple(local.shape)} at offset {s.offset} "
                             f"does not fit in a tensor of shape {s.shape}")
        total += s.numel
    k = operator.index(k)
    if not 0 <= k <= total:
        raise ValueError(f"k must satisfy 0 <= k <= {total} (the total number of scores), got k={k}")
    return total, k


def _locals(scores: Sequence[torch.Tensor | Piece]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This process's tensors of ``scores``, all and those it counts (not a replicated copy)."""
    locals_ = [s.local if isinstance(s, Piece) else s for s in scores]
    return locals_, [t for s, t in zip(scores, locals_) if not isinstance(s, Piece) or s.counted]


class NaNScoresError(ValueError):
    """Scores given to a selection hold NaN, which has no place in a ranking."""


def _raise_if_nan(tensors: Iterable[torch.Tensor], reduce: Reduce | None) -> None:
    (nan,) = _summed([sum(int(torch.count_nonzero(torch.isnan(s))) for s in tensors)], reduce)
    if nan:
        raise NaNScoresError(
            "NaN scores cannot be ranked; replace or remove NaN values before selecting")
