"""Tests for chop.kernels.select against independent references.

Small inputs are checked against a pure-Python ranking (descending value, ties
by position in (tensor, row-major) order); large ones against torch.kthvalue on
a single tensor plus explicit tie-order checks. Selections over pieces spread
over processes are run on threads that sum their histograms through a barrier
(real gloo ranks: tests/chop/kernels/test_distributed.py) and must equal one
process selecting over the whole tensors, ties included.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from chop.kernels import select
from chop.kernels.select import Piece, keep_masks, kth_largest, mask_counts

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, params=["radix", "bracket", "bracket-torch", "direct"])
def path(request, monkeypatch) -> str:
    """Every test runs on each path: the radix passes (also for small inputs), the bracket
    from a sample that one process tries first (falling back to the radix passes when it
    misses), and, for inputs below ``_DIRECT`` entries, one sort of a copy (the default for
    small inputs). The bracket and the final masks compare in numpy on CPU with few torch
    threads, as here, and in torch otherwise (``bracket-torch``)."""
    if request.param != "direct":
        monkeypatch.setattr(select, "_DIRECT", 0)
    if request.param == "radix":
        monkeypatch.setattr(select, "_bracket", lambda *args: None)
    if request.param == "bracket-torch":
        monkeypatch.setattr(select, "_NUMPY_THREADS", 0)
    return request.param


# Pieces and a reduce never take the direct path (it is for one process's plain tensors), so
# on "direct" the tests over processes would repeat the "bracket" run
PIECE_PATHS = pytest.mark.parametrize("path", ["radix", "bracket", "bracket-torch"], indirect=True)


def reference_mask(scores: list[torch.Tensor], k: int) -> list[bool]:
    """Kept flags in concatenated row-major order, via Python's (stable) sort."""
    values = [v for s in scores for v in s.detach().double().reshape(-1).tolist()]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    keep = [False] * len(values)
    for i in order[:k]:
        keep[i] = True
    return keep


def flat_mask(masks: list[torch.Tensor]) -> list[bool]:
    return [bool(v) for m in masks for v in m.reshape(-1).tolist()]


def check(scores: list[torch.Tensor], k: int) -> None:
    """keep_masks equals the reference and kth_largest is consistent with it."""
    masks = keep_masks(scores, k)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert all(m.dtype == torch.bool for m in masks)
    assert sum(int(m.sum()) for m in masks) == k
    assert flat_mask(masks) == reference_mask(scores, k)
    if k:
        t, r = kth_largest(scores, k)
        values = torch.cat([s.detach().double().reshape(-1) for s in scores])
        assert int((values > t).sum()) + r == k
        assert 1 <= r <= int((values == t).sum())


def random_scores(rng: torch.Generator, dtype: torch.dtype, kind: str) -> list[torch.Tensor]:
    def randint(low: int, high: int, size: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.randint(low, high, size, generator=rng)

    shapes = [tuple(randint(1, 9, (int(randint(1, 4)),)).tolist()) for _ in range(int(randint(1, 6)))]
    out = []
    for shape in shapes:
        if kind == "normal":  # mixed signs
            s = torch.randn(shape, generator=rng, dtype=torch.float64)
        elif kind == "few":  # few distinct values, heavy ties
            s = randint(-2, 3, shape).double()
        elif kind == "zeros":
            s = torch.zeros(shape, dtype=torch.float64)
        elif kind == "negative":
            s = -torch.rand(shape, generator=rng, dtype=torch.float64) - 0.5
        else:  # "wide": |x| over many binades, plus exact zeros
            s = torch.randn(shape, generator=rng, dtype=torch.float64).abs() * 2.0 ** randint(-30, 30, shape)
            s[torch.rand(shape, generator=rng) < 0.3] = 0.0
        out.append(s.to(dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "few", "zeros", "negative", "wide"])
def test_matches_reference(dtype: torch.dtype, kind: str) -> None:
    rng = torch.Generator().manual_seed(DTYPES.index(dtype) * 10 + len(kind))
    for _ in range(25):
        scores = random_scores(rng, dtype, kind)
        total = sum(s.numel() for s in scores)
        for k in {0, 1, total // 2, total - 1, total, int(torch.randint(0, total + 1, (1,), generator=rng))}:
            check(scores, max(k, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_16_bit_digits(dtype: torch.dtype) -> None:
    # > 2**15 entries in total switches from 8-bit to 16-bit digits.
    gen = torch.Generator().manual_seed(DTYPES.index(dtype))
    normal = [torch.randn(n, generator=gen).to(dtype) for n in (30_000, 7, 4_000)]
    few = [torch.randint(-3, 4, (n,), generator=gen).to(dtype) / 4 for n in (20_000, 15_000)]
    for scores in (normal, few):
        for k in (1, 17_000, 34_000):
            check(scores, k)


def test_all_zeros_keeps_first_entries() -> None:
    scores = [torch.zeros(3), torch.zeros(2, 4)]
    masks = keep_masks(scores, 5)
    assert masks[0].tolist() == [True, True, True]
    assert masks[1].tolist() == [[True, True, False, False], [False] * 4]
    assert kth_largest(scores, 5) == (0.0, 5)


def test_ties_follow_tensor_then_row_major_order() -> None:
    a = torch.tensor([[1.0, 2.0], [2.0, 0.5]])
    b = torch.tensor([2.0, 3.0, 2.0])
    t, r = kth_largest([a, b], 3)
    assert (t, r) == (2.0, 2)  # 3.0 kept, then the first two 2.0s: both in `a`
    masks = keep_masks([a, b], 3)
    assert masks[0].tolist() == [[False, True], [True, False]]
    assert masks[1].tolist() == [False, True, False]


def test_negative_zero_ties_with_positive_zero() -> None:
    scores = [torch.tensor([0.0, -0.0, 1.0, -1.0]), torch.tensor([-0.0, 0.0])]
    assert kth_largest(scores, 3) == (0.0, 2)
    assert flat_mask(keep_masks(scores, 3)) == [True, True, True, False, False, False]
    only_neg_zero = [torch.tensor([-1.0, -0.0, 2.0, -0.0, 0.0])]
    assert kth_largest(only_neg_zero, 3) == (0.0, 2)
    assert flat_mask(keep_masks(only_neg_zero, 3)) == [False, True, True, True, False]


def test_infinities_are_ranked() -> None:
    scores = [torch.tensor([float("-inf"), 1.0, float("inf"), float("inf")])]
    assert kth_largest(scores, 1) == (float("inf"), 1)
    assert kth_largest(scores, 4) == (float("-inf"), 1)
    check(scores, 3)


def test_float64_exact_in_low_bits() -> None:
    # Distinct only in the lowest mantissa bits: a float32 cast would merge them all.
    base = torch.tensor(1.0, dtype=torch.float64)
    values = torch.stack([base + i * torch.finfo(torch.float64).eps for i in range(64)])
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    scores = [values[perm[:40]], values[perm[40:]].reshape(4, 6)]
    for k in (1, 7, 33, 63):
        t, r = kth_largest(scores, k)
        assert (t, r) == (values[64 - k].item(), 1)
        check(scores, k)


def test_mixed_dtypes_compare_exactly() -> None:
    scores = [torch.tensor([1.0, 1.0001], dtype=torch.float32), torch.tensor([1.0], dtype=torch.float16)]
    assert kth_largest(scores, 2) == (1.0, 1)
    check(scores, 2)


@pytest.mark.parametrize("other", [torch.float32, torch.float16, torch.float8_e5m2])
def test_float8_mixed_with_another_dtype_upcasts_exactly(other: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    scores = [torch.randn(40, generator=g).to(torch.float8_e4m3fn),
              torch.randn(3, 9, generator=g).to(other)]
    check(scores, 20)


@pytest.mark.parametrize("k", [np.int64(5), torch.tensor(5)])
def test_k_of_another_integer_type_counts_as_an_int(k) -> None:
    t, r = kth_largest([torch.tensor([3.0, 2.0, 2.0, 2.0, 2.0, 1.0])], k)
    assert (t, r) == (2.0, 4) and type(r) is int


def test_non_contiguous_and_requires_grad() -> None:
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)).t()
    w = torch.randn(3, 4, requires_grad=True)
    check([x, w], 11)
    assert keep_masks([x], 3)[0].is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_edges(dtype: torch.dtype) -> None:
    scores = [torch.tensor([1.0, -2.0], dtype=dtype), torch.tensor([[0.5]], dtype=dtype)]
    assert flat_mask(keep_masks(scores, 0)) == [False] * 3
    assert flat_mask(keep_masks(scores, 3)) == [True] * 3
    assert kth_largest(scores, 0) == (float("inf"), 0)
    assert kth_largest(scores, 3) == (-2.0, 1)
    assert keep_masks([], 0) == []
    assert kth_largest([], 0) == (float("inf"), 0)


@pytest.mark.parametrize("fn", [keep_masks, kth_largest])
@pytest.mark.parametrize("k", [-1, 4])
def test_k_out_of_range(fn, k: int) -> None:
    with pytest.raises(ValueError, match=r"0 <= k <= 3"):
        fn([torch.ones(3)], k)
    with pytest.raises(ValueError, match=r"0 <= k <= 0"):
        fn([], 1)


@pytest.mark.parametrize("fn", [keep_masks, kth_largest])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_raises(fn, dtype: torch.dtype) -> None:
    for k in (0, 1, 3):
        with pytest.raises(ValueError, match="NaN scores cannot be ranked"):
            fn([torch.tensor([1.0, 2.0], dtype=dtype), torch.tensor([float("nan")], dtype=dtype)], k)
    # A NaN whose payload sits only in the low bits shares the top-16-bit bin with +inf.
    payload = torch.tensor([0x7F800001, 0x3F800000], dtype=torch.int32).view(torch.float32)
    for size in (0, 40_000):  # 8-bit and 16-bit digits
        with pytest.raises(ValueError, match="NaN"):
            fn([torch.ones(size), payload], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_answers_every_rank_with_many_equal_values(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=g, dtype=dtype)
    values[torch.rand(5000, generator=g) < 0.9] = 0.0  # pruned weights score alike
    values[:3] = torch.tensor([float("inf"), -float("inf"), -0.0], dtype=dtype)
    ranks = [1, 2, 250, 499, 500, 501, 2500, 4999, 5000]
    got = select._kth_smallest(values, *ranks)
    ordered = values.sort().values
    assert got == [ordered[j - 1].item() for j in ranks]
    assert all(type(t) is float for t in got)


def test_non_float_rejected() -> None:
    with pytest.raises(TypeError):
        keep_masks([torch.arange(3)], 1)


def test_more_than_2_pow_24_elements() -> None:
    n = 17_000_000  # > 2**24: beyond what torch.quantile accepted (torch <= 2.13)
    x = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for k in (1, 123_457, n // 2):
        t, r = kth_largest([x], k)
        assert t == torch.kthvalue(x, n - k + 1).values.item()
        assert int((x > t).sum()) + r == k
    masks = keep_masks([x[:5], x[5:]], n // 2)
    assert sum(int(m.sum()) for m in masks) == n // 2


def test_ties_cross_chunk_boundaries() -> None:
    # 2**24 + extra zeros with a few ones: the kept zeros must be the first ones.
    n = (1 << 24) + 1000
    x = torch.zeros(n)
    ones = torch.tensor(random.Random(0).sample(range(n), 50))
    x[ones] = 1.0
    k = 50 + 9_000_000  # tie quota runs out in the middle of a chunk
    assert kth_largest([x], k) == (0.0, 9_000_000)
    mask = keep_masks([torch.zeros(10), x], k + 10)[1]
    assert int(mask.sum()) == k and bool(mask[ones].all())
    kept_zero = mask & (x == 0)
    last = int(kept_zero.nonzero().max())
    assert int(kept_zero[: last + 1].sum()) == 9_000_000 and not bool(kept_zero[last + 1 :].any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heavy_bin_streaming_path(dtype: torch.dtype) -> None:
    # > 2**22 entries share the chosen bin, so the next pass streams instead of gathering.
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.float32:  # values in [1, 1 + 2**-7): one top-16-bit bin
        bits = torch.randint(0, 1 << 16, (5_000_000,), generator=gen, dtype=torch.int32)
        x = (bits | 0x3F800000).view(dtype)
    else:  # values 1 + j * 2**-52: same top 32 bits, so two streaming passes
        bits = torch.randint(0, 1 << 20, (5_000_000,), generator=gen)
        x = (bits | 0x3FF0000000000000).view(dtype)
    y = torch.rand(1000, generator=gen, dtype=dtype) * 4
    for k in (10, 2_500_000, 4_999_999):
        t, r = kth_largest([y, x], k)
        both = torch.cat([y, x])
        assert t == torch.kthvalue(both, both.numel() - k + 1).values.item()
        assert int((both > t).sum()) + r == k
        masks = keep_masks([y, x], k)
        assert sum(int(m.sum()) for m in masks) == k


# -- pieces spread over processes ------------------------------------------------------------


def boxes(shape: tuple[int, ...], world: int, how: str) -> list[tuple[slice, ...]]:
    """Each process's box of a tensor: dim-0 row ranges (FSDP2), dim-1 column ranges (a
    row-wise tensor-parallel weight), a 2-D grid, or the whole tensor (replicated)."""
    def split(n: int, parts: int) -> list[slice]:
        size = -(-n // parts)  # torch.chunk's sizes: the last ones may be short or empty
        return [slice(min(i * size, n), min((i + 1) * size, n)) for i in range(parts)]

    whole = [slice(0, n) for n in shape]
    if how == "replicate" or not shape:
        return [tuple(whole)] * world
    if how == "grid" and len(shape) >= 2 and world == 4:
        return [(r, c, *whole[2:]) for r in split(shape[0], 2) for c in split(shape[1], 2)]
    dim = 1 if how in ("cols", "grid") and len(shape) >= 2 else 0
    return [tuple(part if d == dim else whole[d] for d in range(len(shape)))
            for part in split(shape[dim], world)]


def on_processes(world: int, scores: list[torch.Tensor], hows: list[str], call):
    """Runs ``call(pieces, reduce)`` on ``world`` threads, each holding its pieces of
    ``scores``; ``reduce`` sums over the threads. Returns each thread's (pieces, result)."""
    barrier, slots = threading.Barrier(world), [None] * world
    results, errors = [None] * world, []

    def reducer(rank: int):
        def reduce(counts: torch.Tensor) -> torch.Tensor:
            slots[rank] = counts.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        return reduce

    def work(rank: int) -> None:
        try:
            pieces = []
            for s, how in zip(scores, hows):
                box = boxes(tuple(s.shape), world, how)[rank]
                pieces.append(Piece(s[box].clone(), tuple(s.shape),
                                    tuple(b.start for b in box), how != "replicate" or rank == 0))
            results[rank] = pieces, call(pieces, reducer(rank))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def gathered(results, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole masks from each process's masks of its pieces; copies must agree."""
    whole = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    seen = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    for pieces, masks in results:
        for i, (p, m) in enumerate(zip(pieces, masks)):
            assert m.shape == p.local.shape and m.dtype == torch.bool
            box = tuple(slice(o, o + n) for o, n in zip(p.offset, p.local.shape))
            assert not seen[i][box].any() or torch.equal(whole[i][box], m)
            whole[i][box], seen[i][box] = m, True
    return whole


@PIECE_PATHS
@pytest.mark.parametrize("kind", ["normal", "few", "zeros", "wide"])
def test_pieces_over_processes_select_like_one_process(kind: str) -> None:
    rng = torch.Generator().manual_seed(len(kind))
    for trial in range(12):
        dtype = DTYPES[trial % len(DTYPES)]
        scores = random_scores(rng, dtype, kind)
        if trial % 3 == 0:  # -0.0 and +0.0 tie
            scores = [s * torch.where(torch.rand(s.shape, generator=rng) < 0.5, -1.0, 1.0).to(dtype)
                      for s in scores]
        world = (2, 3, 4)[trial % 3]
        hows = [("rows", "cols", "grid", "replicate")[int(torch.randint(0, 4, (1,), generator=rng))]
                for _ in scores]
        total = sum(s.numel() for s in scores)
        for k in {0, 1, total // 3, total - 1, total}:
            results = on_processes(world, scores, hows,
                                   lambda pieces, reduce: keep_masks(pieces, k, reduce=reduce))
            assert flat_mask(gathered(results, scores)) == reference_mask(scores, k), (trial, k)
            if k:
                thresholds = on_processes(world, scores, hows, lambda pieces, reduce: kth_largest(
                    pieces, k, reduce=reduce))
                assert {r for _, r in thresholds} == {kth_largest(scores, k)}


@PIECE_PATHS
@pytest.mark.parametrize("how", ["cols", "rows"])
def test_pieces_stream_and_cut_ties_in_many_chunks(monkeypatch, how: str) -> None:
    # Tiny chunks: every pass streams many chunks, the tie cut runs its own multi-pass
    # selection over positions, and column boxes interleave in the whole row-major order.
    monkeypatch.setattr(select, "_CHUNK", 64)
    monkeypatch.setattr(select, "_SMALL", 256)
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 4, (40, 30), generator=gen).float() / 2,
              torch.randint(0, 4, (31, 9), generator=gen).double()]
    for k in (1, 300, 1000, 1478):
        results = on_processes(2, scores, [how, how],
                               lambda pieces, reduce: keep_masks(pieces, k, reduce=reduce))
        assert flat_mask(gathered(results, scores)) == reference_mask(scores, k), k


def test_mask_counts_count_each_entry_once() -> None:
    scores = [torch.rand(6, 5, generator=torch.Generator().manual_seed(1)), torch.rand(4)]
    results = on_processes(3, scores, ["cols", "replicate"], lambda pieces, reduce: mask_counts(
        keep_masks(pieces, 11, reduce=reduce), pieces, reduce=reduce))
    whole = keep_masks(scores, 11)
    assert [counts for _, counts in results] == [[int(m.sum()) for m in whole]] * 3


def test_each_mask_has_its_own_storage(tmp_path) -> None:
    """Masks are saved side by side (safetensors refuses tensors that share memory) and edited
    one at a time, so no two may share storage, with or without surplus ties."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    for scores in ([torch.rand(3, 4, generator=g), torch.rand(7, generator=g)],
                   [torch.zeros(3, 4), torch.zeros(7)]):  # all tied: the tie cut
        masks = keep_masks(scores, 5)
        assert len({m.untyped_storage().data_ptr() for m in masks}) == len(masks)
        save_file({f"m{i}": m for i, m in enumerate(masks)}, tmp_path / "masks.safetensors")
        masks[0].fill_(True)
        assert int(masks[1].sum()) == flat_mask(keep_masks(scores, 5))[12:].count(True)


def test_keep_masks_and_flat_gives_the_masks_also_as_one_flat_tensor(path: str) -> None:
    from chop.kernels.select import keep_masks_and_flat

    g = torch.Generator().manual_seed(8)
    scores = [torch.rand(30, 20, generator=g).round(decimals=1), torch.rand(50, generator=g)]
    for k in (0, 1, 333, 650):
        masks, flat = keep_masks_and_flat(scores, k)
        assert flat_mask(masks) == reference_mask(scores, k)
        if path == "direct" and 0 < k < 650:  # one sort of a copy: the flat masks come along
            assert flat.tolist() == flat_mask(masks)
        else:
            assert flat is None
        unsplit, alone = keep_masks_and_flat(scores, k, split=False)
        if flat is not None:  # the masks left to split_flat
            assert unsplit is None and torch.equal(alone, flat)
            split = select.split_flat(alone, [s.shape for s in scores])
            assert [m.shape for m in split] == [s.shape for s in scores]
            assert flat_mask(split) == flat_mask(masks)
            assert len({m.untyped_storage().data_ptr() for m in split}) == len(split)
            split[0].fill_(True)  # each its own part: the other mask unchanged
            assert flat_mask(split[1:]) == flat_mask(masks[1:])
        else:
            assert alone is None and flat_mask(unsplit) == flat_mask(masks)


@pytest.mark.parametrize("kind", ["plain", "view", "subclass", "many threads"])
def test_true_counts_equal_torch_counts(kind: str, monkeypatch, path: str) -> None:
    g = torch.Generator().manual_seed(2)
    masks = [torch.rand(40, 30, generator=g) > 0.3, torch.rand(7, generator=g) > 0.9,
             torch.zeros(0, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
    if kind == "view":  # strided: numpy must read the view, not the storage
        masks = [m.t() if m.dim() == 2 else m[::2] for m in masks]
    if kind == "subclass":  # numpy cannot read a subclass: counted by torch
        masks = [torch.nn.Parameter(m, requires_grad=False) for m in masks]
    if kind == "many threads":  # torch on more threads than _NUMPY_THREADS: counted by torch
        monkeypatch.setattr(select, "_NUMPY_THREADS", 0)
    assert select.numpy_compares(masks[0]) == (kind in ("plain", "view")
                                               and path != "bracket-torch")
    assert select.true_counts(masks) == [int(torch.count_nonzero(m)) for m in masks]
    assert select.true_counts([]) == []
    if kind != "view":  # the same counts of the parts of one flat mask
        flat = torch.cat([m.reshape(-1) for m in masks])
        if kind == "subclass":
            flat = torch.nn.Parameter(flat, requires_grad=False)
        sizes = [m.numel() for m in masks]
        assert select.part_counts(flat, sizes) == [int(torch.count_nonzero(m)) for m in masks]


def test_a_piece_must_fit_its_tensor() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        keep_masks([Piece(torch.zeros(3, 2), (4, 2), (2, 0))], 1)
    with pytest.raises(ValueError, match="does not fit"):
        keep_masks([Piece(torch.zeros(3), (4, 1), (0, 0))], 1)



def _recorded(monkeypatch, name: str, *, arguments: bool = False) -> list:
    """Record what each call of ``select.<name>`` returns (for ``_bracket``, None: it fell
    back; a call that raises records nothing), or with ``arguments`` what it is passed."""
    results, real = [], getattr(select, name)

    def spy(*args):
        if arguments:
            results.append(args)
            return real(*args)
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(select, name, spy)
    return results


def _bracketed(monkeypatch) -> list:
    return _recorded(monkeypatch, "_bracket")


class TestBracket:
    """The bracket on its own: taken for large selections on one process, and falling back to
    the radix passes, with the same result, when it misses or would gather too much."""

    @pytest.fixture(autouse=True)
    def path(self, monkeypatch) -> str:
        monkeypatch.setattr(select, "_DIRECT", 0)
        return "bracket"

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("keep", [1, 0.001, 0.1, 0.5, 0.97])
    def test_the_bracket_holds_the_threshold_of_a_large_selection(self, monkeypatch, dtype, keep):
        g = torch.Generator().manual_seed(3)
        scores = [torch.randn(300, 700, generator=g).to(dtype),
                  torch.rand(90_000, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)]
        total = sum(s.numel() for s in scores)
        k = keep if isinstance(keep, int) else round(keep * total)
        found = _bracketed(monkeypatch)
        masks = keep_masks(scores, k)
        t, r = kth_largest(scores, k)
        assert len(found) == 2 and None not in found  # the bracket held, no radix pass ran
        values = torch.cat([s.double().reshape(-1) for s in scores])
        assert t == values.kthvalue(total - k + 1).values.item()
        assert int((values > t).sum()) + r == k
        kept = torch.cat([m.reshape(-1) for m in masks])
        assert int(kept.sum()) == k and bool((values[kept] >= t).all())
        assert bool((values[~kept] <= t).all())
        ties = (values == t).nonzero().squeeze(1)  # ties kept first in position order
        assert kept[ties].tolist() == [True] * r + [False] * (ties.numel() - r)

    def test_a_bracket_that_misses_falls_back_to_the_same_masks(self, monkeypatch) -> None:
        g = torch.Generator().manual_seed(4)
        # the large scores sit off the sample's stride: the sample sees zeros only
        scores = torch.zeros(1 << 18)
        step = (1 << 18) // select._SAMPLE
        large = torch.arange(1 << 18) % step != step // 2
        scores[large] = torch.rand(int(large.sum()), generator=g) + 1
        k = 1 << 16
        found = _bracketed(monkeypatch)
        masks = keep_masks([scores], k)
        assert found == [None]  # it missed: the radix passes decided
        monkeypatch.setattr(select, "_bracket", lambda *args: None)
        assert torch.equal(masks[0], keep_masks([scores], k)[0])

    def test_a_bracket_over_many_equal_scores_gathers_at_most_a_chunk(self, monkeypatch) -> None:
        """The threshold just below a block of 2^17 ones: the band (lo, hi] holds every one,
        more than a chunk (2^16 here), and the radix passes find the threshold. A threshold of
        1.0 (half the ones kept, or the first 10) is lo: the band leaves the ones out, and one
        more pass counts them."""
        monkeypatch.setattr(select, "_CHUNK", 1 << 16)
        g = torch.Generator().manual_seed(3)
        scores = [torch.rand(1 << 16, generator=g) * 0.5, torch.ones(1 << 17),
                  2 + torch.rand(1 << 16, generator=g)]
        found = _bracketed(monkeypatch)
        for k in ((3 << 16) + 10, 1 << 17, (1 << 16) + 10):  # below the ones, in them
            check(scores, k)  # (a bracket for its masks, one for its threshold)
        assert found[0] is None  # the band at 1.0 is larger than a chunk
        assert found[2] == (1.0, 1 << 16, 1 << 17)  # lo is 1.0: its entries counted
        assert found[4] == (1.0, 10, 1 << 17)
        masks = keep_masks(scores, (1 << 16) + 10)
        assert int(masks[1][:10].sum()) == 10 and int(masks[1].sum()) == 10  # the first ones

    def test_a_threshold_below_a_lower_bracket_of_equal_scores_misses(self, monkeypatch) -> None:
        """Every sampled entry is 1.0, the rest below: lo is 1.0 and the threshold lies below
        it, 3 entries past the ones; counting the ones shows the miss."""
        n = 1 << 18
        x = torch.rand(n, generator=torch.Generator().manual_seed(4)) * 0.5
        step = n // select._SAMPLE
        x[step // 2::step] = 1.0
        found = _bracketed(monkeypatch)
        check([x], select._SAMPLE + 3)
        assert found == [None, None]

    @pytest.mark.parametrize("path_", ["numpy", "torch"])
    def test_a_threshold_just_above_many_zeros_is_bracketed(self, monkeypatch, path_) -> None:
        """Progressive pruning: most scores are the pruned weights' 0 and the step keeps a few
        fewer than the rest, so the sample's lower bracket is 0; gathering every 0 missed the
        bracket and the radix passes ran at every step. 0 itself is out of the band; when the
        threshold is 0, one more pass counts the zeros (the radix passes ran before)."""
        if path_ == "torch":
            monkeypatch.setattr(select, "_NUMPY_THREADS", 0)
        g = torch.Generator().manual_seed(6)
        scores = torch.rand(1 << 19, generator=g)
        scores[torch.rand(1 << 19, generator=g) < 0.85] = 0.0
        positive = int(torch.count_nonzero(scores))
        found = _bracketed(monkeypatch)
        for k in (positive - 40, positive - 2_000, positive + 1_000):
            masks = keep_masks([scores], k)
            assert flat_mask(masks) == reference_mask([scores], k), k
        zeros = scores.numel() - positive
        assert found[:2] == [(*found[0][:2], 1), (*found[1][:2], 1)]  # no radix pass
        assert found[2] == (0.0, 1_000, zeros)  # the threshold is 0, among `zeros` ties


class TestPartition:
    """A direct selection (one process, fewer than ``_DIRECT`` entries) from ``_PARTITIONED``
    entries cuts its threshold in linear time (``_cut``) instead of sorting: a block of equal
    values (the zeros of pruned weights) is counted, and the threshold is its value or is cut
    from a band that a sample brackets, which leaves the block out. The same masks, ties at the
    threshold cut in position order, and NaN refused wherever it lies."""

    @pytest.fixture(autouse=True)
    def path(self, monkeypatch) -> list:
        return _recorded(monkeypatch, "_cut")

    @pytest.fixture
    def blocks(self, monkeypatch) -> list:
        return _recorded(monkeypatch, "_block_value")

    @pytest.fixture
    def bands(self, monkeypatch) -> list:
        return _recorded(monkeypatch, "_banded")

    @staticmethod
    def scores(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        flat = torch.randn(20_000, generator=g, dtype=torch.float64)
        assert flat.numel() > 4 * select._PARTITIONED
        return [t.to(dtype) for t in (flat[:3000].view(30, 100), flat[3000:3007], flat[3007:])]

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("keep", [0.9999, 0.1, 0.5, 0.999, 1 / 20_000])
    def test_distinct_scores_are_cut_from_a_band(self, monkeypatch, path, blocks, bands, dtype,
                                                 keep) -> None:
        scores = self.scores(dtype)
        total = sum(s.numel() for s in scores)
        k = max(1, int(keep * total))
        t = kth_largest(scores, k)[0]
        for s in scores[::2]:  # more entries equal to the threshold than the budget keeps
            s.view(-1)[: s.numel() // 50] = t
        check(scores, k)
        blocks.clear()
        bands.clear()
        parted = _recorded(monkeypatch, "_partitioned", arguments=True)
        keep_masks(scores, k)
        assert blocks[0] is None  # the sample shows no block (a band's may: the ties at t)
        assert bands and None not in bands and not parted  # the bracket held the threshold

    def test_fewer_scores_are_sorted(self, path, blocks) -> None:
        scores = [s.reshape(-1)[: select._PARTITIONED - 1] for s in self.scores(torch.float32)[2:]]
        check(scores, 100)
        assert path and not blocks  # no sample looked for a block

    @pytest.mark.parametrize("part", ["above", "in", "below"])
    def test_a_block_of_equal_scores_is_counted_and_left_out(self, monkeypatch, path, blocks,
                                                             part) -> None:
        """Half the scores 0 (a quarter negative, a quarter positive): a threshold in the block
        is the block's value with no band; one just above or below it (where a Pruner's step
        puts it) is cut from a band of the values on its side that holds no 0."""
        scores = self.scores(torch.float32, seed=1)
        for s in scores:
            s[torch.rand(s.shape, generator=torch.Generator().manual_seed(2)) < 0.5] = 0.0
        total = sum(s.numel() for s in scores)
        positive = sum(int(torch.count_nonzero(s > 0)) for s in scores)
        negative = sum(int(torch.count_nonzero(s < 0)) for s in scores)
        k = {"above": positive - 40, "in": total // 2, "below": total - negative + 40}[part]
        check(scores, k)
        blocks.clear()
        path.clear()
        cuts = _recorded(monkeypatch, "_cut", arguments=True)
        keep_masks(scores, k)
        assert blocks[0] == 0.0
        assert (path[-1][0] == 0.0) == (part == "in")  # the first call returns last
        if part == "in":
            assert len(cuts) == 1
        else:
            band = cuts[1][0]
            assert 0 < band.size < total // 4 and not np.any(band == 0.0)
            assert np.all(band > 0) == (part == "above")

    @pytest.mark.parametrize("sign", [1, -1])
    def test_a_small_side_of_a_block_is_cut_from_a_copy(self, monkeypatch, bands, sign) -> None:
        """95% of the scores 0 and the threshold among the rest (above the zeros, or below
        them): the few values on its side are copied and cut, with no band of all values."""
        g = torch.Generator().manual_seed(9)
        x = sign * torch.rand(20_000, generator=g)
        x[torch.rand(x.shape, generator=g) < 0.95] = 0.0
        k = (int(torch.count_nonzero(x > 0)) - 40 if sign > 0
             else int(torch.count_nonzero(x >= 0)) + 40)
        check([x], k)
        bands.clear()
        sides = _recorded(monkeypatch, "_side", arguments=True)
        keep_masks([x], k)
        assert len(sides) == 1 and sides[0][3] == (sign > 0)  # upward when above the zeros
        assert len(bands) <= 1  # at most the copy's own band, not one over all the scores

    def test_a_block_away_from_the_threshold_is_left_alone(self, path, blocks) -> None:
        """30% zeros and 30% ones: the sample shows the zeros first, and the ones are counted
        only when the threshold lies in them; above both, the band holds neither."""
        g = torch.Generator().manual_seed(6)
        x = torch.rand(select._PARTITIONED * 16, generator=g) * 3
        which = torch.rand(x.shape, generator=g)
        x[which < 0.3] = 0.0
        x[(which >= 0.3) & (which < 0.6)] = 1.0
        n = x.numel()
        for k, t in ((n // 20, None), (n // 2, 1.0), (int(n * 0.9), 0.0)):
            check([x], k)
            blocks.clear()
            path.clear()
            keep_masks([x], k)
            assert blocks[0] == 0.0
            if t is None:
                assert path[-1][0] > 1.0 and 1.0 not in blocks
            else:
                assert path[-1][0] == t and blocks[-1] == t

    @pytest.mark.parametrize("block", [False, True])
    def test_a_bracket_that_misses_still_cuts_exactly(self, monkeypatch, bands, block) -> None:
        """The sample's entries lie in a narrow range far from the threshold: the bracket
        misses it, and the values (or the block's side of them) are cut whole."""
        g = torch.Generator().manual_seed(8)
        n = select._PARTITIONED * 8
        x = torch.rand(n, generator=g)
        sampled = torch.from_numpy((select._GOLDEN * n).astype(np.int64))
        x[sampled] = 0.9 + torch.rand(sampled.numel(), generator=g) * 1e-4
        if block:  # 40% zeros, which the sample shows too
            x[torch.rand(n, generator=g) < 0.4] = 0.0
            x[sampled[: 2 * sampled.numel() // 5]] = 0.0
        check([x], int(n * 0.3))
        bands.clear()
        parted = _recorded(monkeypatch, "_partitioned", arguments=True)
        cuts = _recorded(monkeypatch, "_cut", arguments=True)
        keep_masks([x], int(n * 0.3))
        assert bands[0] is None  # missed
        assert bool(parted) != block  # whole by np.partition, or the side alone
        assert block == (len(cuts) > 1 and not np.any(cuts[1][0] == 0.0))

    @pytest.mark.parametrize("seed", range(40))
    def test_cuts_equal_a_sort(self, seed: int) -> None:
        """``_cut`` on values drawn to reach every branch: distinct, a few levels, blocks at
        random values (±0.0 among them), infinities, float32 and float64, sizes around
        ``_PARTITIONED`` and a band's."""
        rng = np.random.default_rng(seed)
        n = int(rng.integers(select._PARTITIONED // 2, select._PARTITIONED * 24))
        dtype = (np.float32, np.float64)[seed % 2]
        values = rng.standard_normal(n).astype(dtype)
        kind = seed % 5
        if kind == 1:  # a few levels
            values = np.round(values * 4) / 4
        elif kind in (2, 3):  # blocks
            for _ in range(int(rng.integers(1, 4))):
                values[rng.random(n) < rng.uniform(0.05, 0.5)] = rng.choice(
                    [0.0, -0.0, rng.standard_normal(), np.inf, -np.inf])
        elif kind == 4:  # a block of zeros in column order, and infinities
            values.reshape(-1)[: n - n % 50].reshape(-1, 50)[:, 5:45] = 0.0
            values[rng.integers(0, n, 20)] = np.inf
        ordered = np.sort(values)
        for j in {0, n - 1, *rng.integers(0, n, 6).tolist()}:
            t, above, at_least = select._cut(values, j)
            assert t == ordered[j]
            assert above == int(np.count_nonzero(values > ordered[j]))
            assert at_least == int(np.count_nonzero(values >= ordered[j]))

    @pytest.mark.parametrize("width", [64, 128, 250])
    def test_zeroed_columns_are_seen_whatever_the_row_length(self, blocks, width) -> None:
        """90% of a weight's input columns pruned to zero, the first column kept: a sample
        that reads one column (a stride that is a multiple of the row length) misses them."""
        g = torch.Generator().manual_seed(5)
        w = torch.rand(2**16 // width + 1, width, generator=g)
        w[:, 1 + torch.randperm(width - 1, generator=g)[: 9 * width // 10]] = 0.0
        check([w], w.numel() // 20)
        assert blocks[0] == 0.0

    @pytest.mark.parametrize("where", ["above", "below", "last"])
    def test_nan_raises_wherever_it_lies(self, path, where) -> None:
        scores = self.scores(torch.float32, seed=3)
        index = {"above": 100, "below": 5000, "last": -1}[where]
        scores[2].view(-1)[index] = float("nan")
        with pytest.raises(ValueError, match="NaN scores cannot be ranked"):
            keep_masks(scores, 2000)
        assert not path  # it raised inside
