"""The Pruner on sharded models, on 2 gloo ranks: FSDP2 (``fully_shard``) and a tensor-parallel
plan. Each rank scores and masks only its shards; the masks, gathered, equal the masks of one
process pruning the unsharded model — with tied scores (exact tie-breaking across shards), with
global, local and bounded selection, and for SNIP on every rank's batches. Scoring leaves the
model as it was, progressive pruning keeps exact counts, and unsupported settings say so."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chop.kernels import distributed
from chop.training.pruner import Pruner


def model(ties: bool) -> nn.Sequential:
    """The same MLP in every process; ``ties``: weights from 5 values, so scores tie a lot."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 3))
    if ties:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randint(-2, 3, p.shape, generator=g) / 4)
    return net


def batches(count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(count)]


def shard(net: nn.Sequential, how: str, world: int) -> nn.Sequential:
    """FSDP2 on every linear and the root, or tensor parallel on the first two linears (the
    last stays a plain tensor on every rank)."""
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(net, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return net


def local_masks(pruner: Pruner, net: nn.Module) -> dict[str, tuple[torch.Tensor, tuple]]:
    """This rank's masks with their offsets in the whole tensors, after checking that the
    local shards are zero where masked."""
    out = {}
    for name, mask in pruner.masks.items():
        param = net.get_parameter(name)
        assert not distributed.local(param)[~mask].any(), name
        out[name] = (mask, distributed.piece(param, mask, name).offset)
    return out


def prune_on_rank(rank, world, how, ties, criterion, sparsity, options, data):
    net = shard(model(ties), how, world)
    pruner = Pruner(net, sparsity, criterion=criterion, mask_options=options, data=data[rank])
    pruner.prune(sparsity)
    return local_masks(pruner, net), pruner.history[-1]


def gather(results) -> dict[str, torch.Tensor]:
    """The whole masks from every rank's (mask, offset); copies (replicated shards) agree."""
    whole, shapes = {}, dict(model(False).named_parameters())
    for masks, _ in results:
        for name, (mask, offset) in masks.items():
            box = tuple(slice(o, o + n) for o, n in zip(offset, mask.shape))
            if name not in whole:
                whole[name] = torch.zeros(shapes[name].shape, dtype=torch.bool)
                seen = whole[name].clone()
                whole[name + "/seen"] = seen
            seen = whole[name + "/seen"]
            assert not seen[box].any() or torch.equal(whole[name][box], mask), name
            whole[name][box], seen[box] = mask, True
    return {k: v for k, v in whole.items() if not k.endswith("/seen")}


def one_process(ties, criterion, sparsity, options, data) -> dict[str, torch.Tensor]:
    pruner = Pruner(model(ties), sparsity, criterion=criterion, mask_options=options, data=data,
                    example_inputs=data[0][0])
    return pruner.prune(sparsity)


CASES = [  # how, ties, (sharded criterion, one-process criterion), sparsity, mask options
    ("fsdp", True, ("magnitude", "magnitude"), 0.6, {"biases": True}),
    ("fsdp", True, ("magnitude", "magnitude"), 0.7, {"scope": "local"}),
    ("fsdp", True, ("magnitude", "magnitude"), 0.9,
     {"min_sparsity": 0.2, "max_sparsity": 0.85, "min_keep": 4}),
    ("fsdp", False, ("snip", "snip{batches=2}"), 0.8, {}),  # each rank scores its own batch
    ("fsdp", False, ("gradient", "gradient{batches=2}"), 0.8, {"scope": "local"}),
    ("tp", True, ("magnitude", "magnitude"), 0.6, {"biases": True}),
    ("tp", True, ("magnitude", "magnitude"), 0.8, {"scope": "local", "min_keep": 3}),
    ("tp", False, ("snip", "snip"), 0.8, {}),  # tensor parallel: every rank the same batch
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2][0]}-{c[4]}")
def test_gathered_sharded_masks_equal_one_process(ranks, case):
    how, ties, (sharded, alone), sparsity, options = case
    data = batches()
    per_rank = [[data[0]], [data[1]]] if how == "fsdp" else [[data[0]], [data[0]]]
    results = ranks.run(prune_on_rank, how, ties, sharded, sparsity, options, per_rank)
    expected = one_process(ties, alone, sparsity, options, data if how == "fsdp" else data[:1])
    got = gather(results)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    kept = sum(int(m.sum()) for m in expected.values())
    assert [h["kept"] for _, h in results] == [kept, kept]  # counted over the whole model
    assert results[0][1]["numel"] == sum(m.numel() for m in expected.values())


def scoring_leaves_the_model(rank, world):
    net = shard(model(False), "fsdp", world)
    first = net[0].weight
    first.grad = torch.full_like(first, 3.0)  # a DTensor gradient the training loop left
    net[2].weight.requires_grad_(False)
    before = {k: distributed.local(v).clone() for k, v in net.state_dict().items()}
    pruner = Pruner(net, 0.5, criterion="snip", data=[batches()[rank]])
    pruner.score()
    unchanged = all(torch.equal(distributed.local(v), before[k])
                    for k, v in net.state_dict().items())
    grad = distributed.local(first.grad)
    grads = (grad.shape == (6, 6) and bool((grad == 3.0).all()),
             all(p.grad is None for p in list(net.parameters())[1:]))
    frozen = net[2].weight.requires_grad
    return unchanged, grads, frozen, net.training, sorted(pruner.sharded.scores)


def test_scoring_a_sharded_model_leaves_it_as_it_was(ranks):
    for unchanged, grads, frozen, training, scored in ranks.run(scoring_leaves_the_model):
        assert unchanged and grads == (True, True)
        assert frozen is False and training
        assert scored == ["0.weight", "2.weight", "4.weight"]


def train_on_rank(rank, world):
    net = shard(model(False), "fsdp", world)
    pruner = Pruner(net, 0.9, criterion="snip-momentum{source=grad}", schedule="linear",
                    start_step=1, end_step=5, frequency=2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = batches()[rank]
    counts, before = [], None
    for step in range(7):
        pruner.on_step_begin(step)
        F.cross_entropy(net(x), y).backward()
        pruner.on_before_optimizer_step()
        optimizer.step()
        pruner.on_after_optimizer_step()
        optimizer.zero_grad()
        masks = local_masks(pruner, net)
        counts.append(pruner.sharded.counts(pruner.masks)[0] if masks else None)
        if before:  # a pruned weight never comes back
            assert all(not (m & ~before[k]).any() for k, (m, _) in masks.items())
        before = {k: m.clone() for k, (m, _) in masks.items()}
    return counts, [pruner.schedule.sparsity_at(s) for s in range(7)]


def test_progressive_pruning_of_a_sharded_model_keeps_exact_counts(ranks):
    total = sum(p.numel() for n, p in model(False).named_parameters() if n.endswith("weight"))
    for counts, sparsities in ranks.run(train_on_rank):
        assert sparsities[:3] == [0, 0, 0] and sparsities[5:] == [0.9, 0.9]
        assert counts[:3] == [None] * 3  # the linear schedule starts at 0: nothing to prune
        for step in range(3, 7):
            assert counts[step] == math.floor((1 - sparsities[step]) * total + 0.5), step


def locked_on_rank(rank, world, locked):
    net = shard(model(False), "fsdp", world)
    pruner = Pruner(net, 0.9, mode="pattern-lock", masks=locked)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    x, y = batches()[rank]
    pruner.on_train_begin()
    for step in range(2):
        pruner.on_step_begin(step)
        F.cross_entropy(net(x), y).backward()
        pruner.on_before_optimizer_step()
        optimizer.step()
        pruner.on_after_optimizer_step()
        optimizer.zero_grad()
    for name, mask in pruner.masks.items():  # pruned gradients were zeroed: no momentum
        buffer = optimizer.state[net.get_parameter(name)]["momentum_buffer"]
        assert not distributed.local(buffer)[~mask].any(), name
    return local_masks(pruner, net), None


def test_pattern_lock_slices_whole_masks_to_each_shard(ranks):
    g = torch.Generator().manual_seed(3)
    locked = {name: torch.rand(p.shape, generator=g) < 0.4
              for name, p in model(False).named_parameters() if name.endswith("weight")}
    got = gather(ranks.run(locked_on_rank, locked))  # the ranks checked the zeros
    assert got.keys() == locked.keys()
    assert all(torch.equal(got[k], locked[k]) for k in locked)


def refused(rank, world):
    from chop.errors import OptionError

    net = shard(model(False), "fsdp", world)
    messages = []
    for kwargs in ({"criterion": "grasp"}, {"mask_options": {"granularity": "2x2"}},
                   {"criterion": "snip{accumulate=sum-of-abs}"}):
        try:
            Pruner(net, 0.5, data=[batches()[rank]], **kwargs).prune(0.5)
        except OptionError as e:
            messages.append(str(e))
    return messages


def test_unsupported_criteria_and_granularities_say_what_works(ranks):
    for grasp, granularity, per_batch in ranks.run(refused):
        assert "grasp cannot score a sharded model" in grasp
        assert all(name in grasp for name in ("magnitude", "snip", "gradient", "snip-momentum"))
        assert "element by element" in granularity
        # FSDP's backward gives the ranks' mean gradient: per-rank |g·w| terms are gone (the
        # masks differed from one process's in 36 of 448 entries)
        assert "accumulate=sum-of-abs" in per_batch and "use accumulate=abs-of-sum" in per_batch


def ddp_on_rank(rank, world):
    net = model(False)
    pruner = Pruner(nn.parallel.DistributedDataParallel(net), 0.5, criterion="magnitude",
                    example_inputs=batches()[0][0])
    masks = pruner.prune(0.5)
    return {name: int(mask.sum()) for name, mask in masks.items()}, bool(
        (net[0].weight == 0).sum() == net[0].weight.numel() - masks["0.weight"].sum())


def test_a_ddp_wrapped_model_is_pruned_through_the_module_it_wraps(ranks):
    """Pruner(DDP(model)) traced DDP's forward, which torch.export cannot capture: a
    TraceError telling the user to check their inputs."""
    total = 6 * 12 + 12 * 9 + 9 * 3
    for kept, applied in ranks.run(ddp_on_rank):
        assert set(kept) == {"0.weight", "2.weight", "4.weight"} and applied
        assert sum(kept.values()) == math.floor(0.5 * total + 0.5)


def one_rank_fails_in_its_loss(rank, world):
    net = shard(model(False), "fsdp", world)

    def loss(outputs, targets):
        if rank == 1:
            raise ValueError("rank 1's loss broke")
        return F.cross_entropy(outputs, targets)

    try:
        Pruner(net, 0.5, criterion="snip", data=[batches()[rank]], loss=loss).prune(0.5)
    except Exception as e:  # noqa: BLE001 - what each rank saw
        return type(e).__name__, str(e)
    return "no error", ""


def test_a_rank_failing_under_fsdp_is_a_distributed_error_on_the_others(ranks):
    """Rank 0 waited in FSDP's backward for a rank that had failed: a raw RuntimeError from
    gloo (a DataError blaming the data when it was the forward)."""
    zero, one = ranks.run(one_rank_fails_in_its_loss, timeout=10.0)
    assert one[0] == "DataError" and "rank 1's loss broke" in one[1]
    assert zero[0] == "DistributedError"
    assert "a collective of the model's backward failed on rank 0 of 2" in zero[1]


def ranks_score_different_counts(rank, world, counts, have):
    net = shard(model(False), "fsdp", world)
    try:
        Pruner(net, 0.5, criterion=f"snip{{batches={counts[rank]}}}",
               data=batches(2)[:have[rank]]).prune(0.5)
    except Exception as e:  # noqa: BLE001 - what each rank saw
        return type(e).__name__, str(e)
    return "no error", ""


def test_ranks_scoring_different_numbers_of_batches_are_told_so_at_once(ranks):
    """Under FSDP2 a rank with fewer batches left the other waiting in a collective until the
    process group's timeout (30 minutes by default)."""
    zero, one = ranks.run(ranks_score_different_counts, (2, 1), (2, 2), timeout=60.0)
    assert zero[0] == one[0] == "DistributedError"
    assert "snip on rank 0 scores 2 batch(es), but another rank scores 1" in zero[1]
    assert "snip on rank 1 scores 1 batch(es), but another rank scores 2" in one[1]
    zero, one = ranks.run(ranks_score_different_counts, (2, 2), (2, 1), timeout=60.0)
    assert one[0] == "DataError" and "asked for 2 batches but data gave 1" in one[1]
    assert zero[0] == "DistributedError" and "(its data ran short)" in zero[1]

