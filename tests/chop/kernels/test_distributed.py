"""chop.kernels.distributed on 2 real gloo ranks: sums over the ranks equal the sum of what each
rank holds, mismatched ranks and failed or stuck ranks become a DistributedError on the others
within the collective timeout (never a hang), and pieces of DTensors sit where their shards lie
in the whole tensor."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from chop.errors import DistributedError
from chop.kernels import distributed
from chop.kernels.select import keep_masks


def rank_tensors(rank: int) -> list[torch.Tensor]:
    """What rank ``rank`` holds: small and large, float32/float64, one transposed."""
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(3, 4, generator=g), torch.randn(7, generator=g, dtype=torch.float64),
            torch.randn(5, 6, generator=g).t(), torch.randn(2, generator=g),
            torch.randn(40, generator=g)]


def summed(rank, world, bucket):
    distributed._BUCKET = bucket  # this rank's copy of the module: small buckets, many flushes
    tensors = rank_tensors(rank)
    distributed.sum_over_ranks(tensors, what="test")
    return tensors, distributed.active(), distributed.rank(), distributed.world_size()


@pytest.mark.parametrize("bucket", [1 << 24, 13])
def test_sum_over_ranks_is_the_sum_of_every_ranks_tensors(ranks, bucket):
    results = ranks.run(summed, bucket)
    expected = [a + b for a, b in zip(rank_tensors(0), rank_tensors(1))]
    for rank, (tensors, active, number, world) in enumerate(results):
        assert (active, number, world) == (True, rank, 2)
        for got, want in zip(tensors, expected):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert tensors[2].stride() == (1, 6)  # summed in place: the transposed layout stays
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


def test_without_a_process_group_nothing_is_distributed():
    assert (distributed.active(), distributed.rank(), distributed.world_size()) == (False, 0, 1)
    assert distributed.local(torch.ones(2)).shape == (2,)
    assert not distributed.is_dtensor(torch.ones(2))


def mismatched(rank, world):
    distributed.sum_over_ranks(rank_tensors(rank)[: 2 + rank], what="scoring")


def test_ranks_that_sum_different_tensors_all_fail_clearly(ranks):
    outcomes = ranks.run(mismatched, check=False)
    for outcome in outcomes:
        assert outcome[:2] == ("error", "DistributedError")
        assert "the ranks sum different tensors" in outcome[2]
        assert "between 2 and 3 tensors" in outcome[2]


def disagreeing(rank, world, how):
    tensors = rank_tensors(0)
    if how == "dtype" and rank == 1:  # the same sizes: gloo aborted on the mixed dtypes
        tensors[0] = tensors[0].double()
    accumulate = "sum-of-abs" if how == "options" and rank == 1 else "abs-of-sum"
    distributed.sum_over_ranks(tensors, what="scoring", agree=f"snip{{accumulate={accumulate}}}")


@pytest.mark.parametrize(("how", "message"), [
    ("options", "the ranks score differently (rank {rank}: snip{{accumulate="),
    ("dtype", "the ranks sum tensors of different shapes or dtypes"),
])
def test_ranks_that_score_differently_all_fail_clearly(ranks, how, message):
    """snip on one rank and gradient (or sum-of-abs) on another added unrelated sums: the
    masks differed per rank, silently; mixed dtypes aborted the process in gloo."""
    for rank, outcome in enumerate(ranks.run(disagreeing, how, check=False)):
        assert outcome[:2] == ("error", "DistributedError")
        assert message.format(rank=rank) in outcome[2]


def one_fails(rank, world, how):
    if rank == 1:
        if how == "stuck":
            time.sleep(3)  # never reaches the collective before rank 0 gives up
            return None
        raise ValueError("rank 1's data loader broke")
    start = time.monotonic()
    try:
        distributed.sum_over_ranks([torch.ones(3)], what="snip: summing the scores")
    except DistributedError as e:
        return "DistributedError", str(e), time.monotonic() - start
    return "no error", "", time.monotonic() - start


@pytest.mark.parametrize("how", ["raises", "stuck"])
def test_a_failed_rank_makes_the_others_fail_within_the_timeout(ranks, how):
    start = time.monotonic()
    outcomes = ranks.run(one_fails, how, timeout=2.0, check=False)
    if how == "raises":
        assert outcomes[1][:2] == ("error", "ValueError")
    kind, message, waited = outcomes[0][1]
    assert kind == "DistributedError"
    assert "snip: summing the scores: torch.distributed all_reduce failed on rank 0 of 2" in message
    assert "timeout" in message and "other ranks" in message
    assert waited < 10 and time.monotonic() - start < 30
    assert ranks.run(summed, 1 << 24)  # the ranks are usable again afterwards


def dtensor_pieces(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    fsdp = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    fully_shard(fsdp)
    mesh = init_device_mesh("cpu", (world,))
    tp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    parallelize_module(tp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    out = {}
    for prefix, model in (("fsdp", fsdp), ("tp", tp)):
        for name, p in model.named_parameters():
            local = distributed.local(p)
            piece = distributed.piece(p, local.detach(), name)
            out[f"{prefix}.{name}"] = (piece.shape, piece.offset, tuple(local.shape),
                                       piece.counted, distributed.is_dtensor(p))
    out["plain"] = distributed.piece(torch.ones(2, 3), torch.ones(2, 3), "plain").counted
    return out


def test_pieces_of_fsdp2_and_tensor_parallel_shards(ranks):
    zero, one = ranks.run(dtensor_pieces)
    # FSDP2: row ranges, uneven (5 rows: 3 + 2; 2 rows: 1 + 1)
    assert zero["fsdp.0.weight"] == ((5, 3), (0, 0), (3, 3), True, True)
    assert one["fsdp.0.weight"] == ((5, 3), (3, 0), (2, 3), True, True)
    assert one["fsdp.1.bias"] == ((2,), (1,), (1,), True, True)
    # tensor parallel: column-wise rows, row-wise columns, a replicated bias counted once
    assert one["tp.0.weight"] == ((4, 3), (2, 0), (2, 3), True, True)
    assert one["tp.2.weight"] == ((2, 4), (0, 2), (2, 2), True, True)
    assert zero["tp.2.bias"][3] and not one["tp.2.bias"][3]
    assert zero["plain"] and not one["plain"]


def select_pieces(rank, world, scores, ks, split):
    """keep_masks over this rank's pieces of ``scores`` for each k, histograms summed over the
    ranks; returns the masks and the boxes."""
    pieces, index = [], []
    for s, how in zip(scores, split):
        if how == "replicate":
            box = tuple(slice(0, n) for n in s.shape)
        else:
            dim = 0 if how == "rows" else 1
            size = -(-s.shape[dim] // world)
            lo, hi = min(rank * size, s.shape[dim]), min((rank + 1) * size, s.shape[dim])
            box = tuple(slice(lo, hi) if d == dim else slice(0, n) for d, n in enumerate(s.shape))
        pieces.append(distributed.Piece(s[box].clone(), tuple(s.shape),
                                        tuple(b.start for b in box),
                                        counted=how != "replicate" or rank == 0))
        index.append(box)
    reduce = distributed.count_reducer("test selection")
    return [keep_masks(pieces, k, reduce=reduce) for k in ks], index


def test_selection_over_real_ranks_equals_one_process_with_ties(ranks):
    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 3, (5, 4), generator=g).float(),  # heavy ties across ranks
              torch.randint(0, 3, (3, 7), generator=g).float(),
              torch.zeros(4)]
    ks = list(range(46))  # every k: every place the threshold can fall among the ties
    results = ranks.run(select_pieces, scores, ks, ["cols", "rows", "replicate"])
    for i, k in enumerate(ks):
        gathered = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
        for per_k, index in results:
            for whole, mask, box in zip(gathered, per_k[i], index):
                whole[box] |= mask
        assert all(torch.equal(a, b) for a, b in zip(gathered, keep_masks(scores, k))), k
