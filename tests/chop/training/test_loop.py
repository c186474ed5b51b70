"""chop.training.loop: the seeded eval split, sample indexing for any input structure, eval-mode
accuracy, and the training loop over a masked graph (masks hold, one record per epoch, the loss
falls on an easy task, pruning while training)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chop
from chop.errors import DataError
from chop.ir.masks import current_masks
from chop.passes.export.fold import fold_masks
from chop.training.loop import (
    FastMasks,
    TrainSpec,
    accuracy,
    fast_masks,
    split,
    take_samples,
    train_graph,
)


def easy_task(count: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """16 features, 4 classes given by a fixed linear map: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 16, generator=g)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(99))
    return x, (x @ teacher).argmax(-1)


def test_take_samples_indexes_every_tensor_of_any_structure():
    index = torch.tensor([2, 0])
    ids, mask = torch.arange(12).reshape(4, 3), torch.ones(4, 3, dtype=torch.bool)
    taken = take_samples({"input_ids": ids, "attention_mask": mask, "n": 3}, index)
    assert set(taken) == {"input_ids", "attention_mask", "n"}
    assert torch.equal(taken["input_ids"], ids[[2, 0]]) and taken["n"] == 3
    assert torch.equal(taken["attention_mask"], mask[[2, 0]])
    a, b = take_samples((ids, ids * 10), index)
    assert torch.equal(a, ids[[2, 0]]) and torch.equal(b, ids[[2, 0]] * 10)
    assert torch.equal(take_samples(ids, index), ids[[2, 0]])


@pytest.mark.parametrize(("count", "fraction", "held"), [(10, 0.2, 2), (10, 0.25, 3), (7, 0.5, 4),
                                                         (3, 0.34, 1)])
def test_split_sizes_disjoint_and_complete(count, fraction, held):
    inputs = {"x": torch.arange(count) * 10}
    targets = torch.arange(count)
    (train_in, train_t), (eval_in, eval_t) = split(inputs, targets, fraction, seed=0)
    assert len(eval_t) == held and len(train_t) == count - held
    assert sorted(torch.cat([train_t, eval_t]).tolist()) == list(range(count))
    assert torch.equal(train_in["x"], train_t * 10) and torch.equal(eval_in["x"], eval_t * 10)


def test_split_is_seeded():
    x, y = torch.randn(50, 3), torch.arange(50)
    first, again, other = (split(x, y, 0.3, seed) for seed in (1, 1, 2))
    assert torch.equal(first[1][1], again[1][1]) and torch.equal(first[0][0], again[0][0])
    assert not torch.equal(first[1][1], other[1][1])


def test_split_without_eval_keeps_every_sample_for_training():
    y = torch.arange(5)
    (_, train_t), evaluation = split(y.float(), y, 0.0, seed=0)
    assert evaluation is None and sorted(train_t.tolist()) == list(range(5))


@pytest.mark.parametrize(("count", "fraction", "left"), [(3, 0.1, "no eval"), (2, 0.9, "no training")])
def test_split_refuses_a_fraction_that_empties_a_side(count, fraction, left):
    with pytest.raises(DataError, match=rf"eval_fraction = {fraction} of {count} samples leaves {left} samples"):
        split(torch.zeros(count, 2), torch.zeros(count), fraction, seed=0)


def test_accuracy_is_the_eval_mode_hand_count(cnn, cnn_graph):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 3, 8, 8, generator=g)  # batches of 4: 4, 4, 5 (no batch of 1)
    cnn.eval()
    with torch.no_grad():
        predicted = cnn(x).argmax(-1)
    targets = torch.where(torch.arange(13) % 3 == 0, (predicted + 1) % 10, predicted)
    expected = int((predicted == targets).sum()) / 13
    assert expected == pytest.approx(8 / 13)
    assert cnn_graph.training
    assert accuracy(cnn_graph, x, targets, batch_size=4) == expected
    assert cnn_graph.training  # the mode is restored
    assert accuracy(cnn_graph, x, targets, batch_size=13) == expected


def test_train_graph_keeps_masks_and_learns(mlp):
    x, y = easy_task()
    graph = chop.trace(mlp, (x[:2],))
    chop.run(graph, "magnitude, mask{sparsity=0.5}")
    masks = {k: v.clone() for k, v in current_masks(graph).items()}
    before = {k: graph.parameter(k).detach().clone() for k in masks}
    seen, tracked = [], []

    def track(items, total, description):
        tracked.append((total, description))
        return items

    records = train_graph(graph, (x[:80], y[:80]), (x[80:], y[80:]),
                          TrainSpec(lr=0.01, epochs=4, seed=0), batch_size=16,
                          track=track, on_epoch=seen.append)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and seen == records
    assert set(records[0]) == {"epoch", "loss", "train_accuracy", "eval", "seconds"}
    assert tracked == [(5, f"epoch {e}/4") for e in range(1, 5)]
    losses = [r["loss"] for r in records]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.8 * losses[0]
    assert records[-1]["train_accuracy"] > records[0]["train_accuracy"]
    assert 0.0 <= records[-1]["eval"]["accuracy"] <= 1.0
    assert records[-1]["eval"]["accuracy"] == accuracy(graph, x[80:], y[80:], 16)
    assert not graph.training  # left in eval mode
    for name, mask in masks.items():  # trained with fast_masks: pruned weights are zeroed
        weight = graph.parameter(name).detach()
        assert torch.count_nonzero(weight[~mask]) == 0 and before[name][~mask].any()
        assert not torch.equal(weight[mask], before[name][mask])  # the kept ones trained
    assert all(torch.equal(current_masks(graph)[k], masks[k]) for k in masks)
    fold_masks(graph)
    for name, mask in masks.items():
        assert torch.count_nonzero(graph.parameter(name)[~mask]) == 0


def test_one_sgd_epoch_equals_a_plain_loop_in_the_seeded_order(mlp):
    x, y = easy_task(48)
    reference = copy.deepcopy(mlp)  # the graph shares (and trains) mlp's own parameters
    graph = chop.trace(mlp, (x[:2],))
    spec = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01, epochs=1, seed=3)
    (record,) = train_graph(graph, (x, y), None, spec, batch_size=16)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    total = 0.0
    for start in range(0, 48, 16):
        index = order[start:start + 16]
        loss = F.cross_entropy(reference(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * 16
    assert record["loss"] == pytest.approx(total / 48, rel=1e-5)
    assert record["eval"] is None
    for name, value in reference.named_parameters():
        torch.testing.assert_close(graph.parameter(name), value)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_training_uses_torchs_fused_optimizer(mlp, monkeypatch, name):
    """torch's fused Adam/SGD: on CPU several times faster a step, and the default Adam's
    sqrt runs slowly on the zero moments that every pruned entry has."""
    made = []
    for cls in (torch.optim.SGD, torch.optim.Adam):
        class Spy(cls):
            def __init__(self, *args, **kwargs):
                made.append(kwargs.get("fused"))
                super().__init__(*args, **kwargs)
        monkeypatch.setattr(torch.optim, cls.__name__, Spy)
    x, y = easy_task(32)
    graph = chop.trace(mlp, (x[:2],))
    train_graph(graph, (x, y), None, TrainSpec(optimizer=name, epochs=1), batch_size=16)
    assert made == [True]


def test_a_last_batch_of_one_joins_the_one_before():
    """A batch of 1 would fail in BatchNorm's train mode; the loop never makes one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    x, y = easy_task(17)
    graph = chop.trace(model, (x[:2],))
    tracked = []
    records = train_graph(graph, (x, y), (x, y), TrainSpec(epochs=1), batch_size=8,
                          track=lambda items, total, what: tracked.append(total) or items)
    assert tracked == [2] and len(records) == 1  # 8 + 9, not 8 + 8 + 1
    assert records[0]["eval"]["accuracy"] == accuracy(graph, x, y, 8)


def test_train_graph_seeds_dropout_and_leaves_the_global_rng_alone(cnn, cnn_batches):
    x = torch.cat([b[0] for b in cnn_batches])
    y = torch.cat([b[1] for b in cnn_batches])

    def run(global_seed: int) -> float:
        graph = chop.trace(copy.deepcopy(cnn), (x[:2],))
        torch.manual_seed(global_seed)
        loss = train_graph(graph, (x, y), None, TrainSpec(epochs=1, seed=5), batch_size=6)[0]["loss"]
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # the global RNG stream is not consumed
        return loss

    assert run(1) == run(2)


def test_train_graph_prunes_along_the_schedule(mlp):
    x, y = easy_task(64)
    graph = chop.trace(mlp, (x[:2],))
    spec = TrainSpec(lr=0.01, epochs=2, prune_sparsity=0.8, prune_schedule="linear",
                     prune_start=0, prune_end=4, prune_frequency=2)
    records = train_graph(graph, (x, y), None, spec, batch_size=16)  # 4 steps per epoch
    masks = current_masks(graph)
    assert set(masks) == {"layers.0.weight", "layers.1.weight", "layers.2.weight"}
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert [r["sparsity"] for r in records][-1] == pytest.approx(0.8)


def test_a_schedule_past_the_last_step_is_warned_about(mlp, caplog):
    # chop train stopped at sparsity 0.95 of 0.99, exit 0, saying nothing
    x, y = easy_task(64)
    spec = TrainSpec(lr=0.01, epochs=2, prune_sparsity=0.8, prune_schedule="linear",
                     prune_start=0, prune_end=10, prune_frequency=2)
    with caplog.at_level("WARNING", logger="chop"):
        records = train_graph(chop.trace(mlp, (x[:2],)), (x, y), None, spec, batch_size=16)
    assert [m for m in caplog.messages if "prune_end" in m] == [
        "[train] prune_end = 10 is after the run's last step (7: 2 epoch(s) of 4 batches, "
        "counted from 0): the run stops at sparsity 0.48 of prune_sparsity 0.8; set prune_end "
        "to at most 7, or train longer"]
    assert records[-1]["sparsity"] == pytest.approx(0.48, abs=1e-3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="chop"):
        train_graph(chop.trace(mlp, (x[:2],)), (x, y), None,
                    TrainSpec(lr=0.01, epochs=2, prune_sparsity=0.8, prune_end=7), batch_size=16)
    assert not [m for m in caplog.messages if "prune_end" in m]


def test_train_graph_refuses_to_prune_below_the_masks_sparsity(mlp):
    x, y = easy_task(64)
    graph = chop.run(chop.trace(mlp, (x[:2],)), "magnitude, mask{sparsity=0.9}")
    before = {k: v.clone() for k, v in current_masks(graph).items()}
    spec = TrainSpec(lr=0.01, epochs=1, prune_sparsity=0.5, prune_end=2)
    with pytest.raises(chop.OptionError, match=r"prune_sparsity = 0.5 is below .*\(90.0%\)"):
        train_graph(graph, (x, y), None, spec, batch_size=16)
    assert all(torch.equal(current_masks(graph)[k], m) for k, m in before.items())


def test_pruning_during_training_keeps_the_pipelines_selection(mlp):
    """chop train's Pruner used mask's defaults (global, every layer) whatever [passes.mask]
    said: an excluded layer got pruned, a local scope became global."""
    x, y = easy_task(64)
    graph = chop.run(chop.trace(mlp, (x[:2],)),
                     "magnitude, mask{sparsity=0.5, scope=local, exclude='layers.0'}")
    spec = TrainSpec(lr=0.01, epochs=1, prune_sparsity=0.8, prune_end=2)
    train_graph(graph, (x, y), None, spec, batch_size=16,
                mask_options={"scope": "local", "exclude": "layers.0"})
    masks = current_masks(graph)
    assert set(masks) == {"layers.1.weight", "layers.2.weight"}
    for mask in masks.values():  # local: every layer at 80%
        assert int(mask.sum()) == round(0.2 * mask.numel())


def test_the_masks_own_rounded_sparsity_is_not_below_itself(mlp):
    """Kept counts are whole: 70% of 3 layers is 70.0006% once rounded, and prune_sparsity
    = 0.7 was refused as "below the sparsity the masks already have (70.0%)"."""
    x, y = easy_task(64)
    graph = chop.run(chop.trace(mlp, (x[:2],)), "magnitude, mask{sparsity=0.7, scope=local}")
    masks = current_masks(graph)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept < 0.3 * sum(m.numel() for m in masks.values())  # rounded down: above 70%
    spec = TrainSpec(lr=0.01, epochs=1, prune_sparsity=0.7, prune_end=2,
                     prune_criterion="magnitude")
    train_graph(graph, (x, y), None, spec, batch_size=16, mask_options={"scope": "local"})


def test_a_diverging_run_stops_with_an_error_before_anything_is_kept(mlp):
    """lr = 1e30 made every weight NaN; the run went on to write them (and its report's
    loss was null, which the table could not print: exit 3)."""
    x, y = easy_task(64)
    graph = chop.trace(mlp, (x[:2],))
    spec = TrainSpec(lr=1e30, epochs=1, optimizer="sgd")
    with pytest.raises(DataError, match=r"training diverged: .* lower the learning rate "
                                        r"\(lr = 1e\+30\)"):
        train_graph(graph, (x, y), None, spec, batch_size=16)


def test_evaluate_perplexity_and_a_loss_of_your_own(mlp):
    """Perplexity: exp of the mean cross-entropy per scored target (-100 ignored) over all
    batches, not the mean of per-batch means; a user's loss: its mean weighted by batch size."""
    from chop.training.loop import evaluate

    graph = chop.trace(mlp, (torch.randn(2, 16),))
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))
               for n in (5, 3)]
    batches[1][1][0] = -100  # an ignored target
    mlp.eval()
    with torch.no_grad():
        logits = torch.cat([mlp(x) for x, _ in batches])
    targets = torch.cat([t for _, t in batches])
    kept = targets != -100
    mean = float(F.cross_entropy(logits[kept], targets[kept]))
    got = evaluate(graph, batches, "perplexity")
    assert got["loss"] == pytest.approx(mean, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
    accuracy_ = evaluate(graph, batches, "accuracy")
    assert accuracy_["accuracy"] == int((logits.argmax(1) == targets)[kept].sum()) / 7

    def mine(outputs, targets):
        return (outputs.sum(1) - targets.float().clamp(min=0)).abs().mean()

    with torch.no_grad():
        per_batch = [float(mine(mlp(x), t)) for x, t in batches]
    assert evaluate(graph, batches, "loss", mine)["loss"] == pytest.approx(
        (5 * per_batch[0] + 3 * per_batch[1]) / 8, rel=1e-5)
    with pytest.raises(DataError, match="evaluating the held-out batches: the default "
                                        "cross-entropy loss raised"):
        evaluate(graph, [(batches[0][0], torch.zeros(5, 2, dtype=torch.long))], "accuracy")


# -- fast_masks: the masks kept in the weights ---------------------------------------------------
# Inside fast_masks the kept weights must get exactly the masked graph's gradients and updates:
# the forward reads weights that are bit for bit the mask node's product (w * m, zeroed in
# place on entry), and the gradient of a kept entry is the same value either way (× 1). So the
# losses and the kept weights are compared exactly, over several steps of each optimizer.

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def masked_twins(model: nn.Module, example: torch.Tensor) -> tuple[chop.Graph, chop.Graph]:
    graph = chop.trace(model, (example,))
    chop.run(graph, "magnitude, mask{sparsity=0.9, scope=global}")
    return graph, graph.copy()


def steps(graph: chop.Graph, optimizer: torch.optim.Optimizer, batches, count: int
          ) -> list[torch.Tensor]:
    losses = []
    graph.train()
    for i in range(count):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(graph.module(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(graph.module.parameters(), 1.0)  # reads the gradients
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fast_masks_train_exactly_as_the_masked_graph(name, model, mlp, cnn, cnn_batches):
    if model == "mlp":
        g = torch.Generator().manual_seed(5)
        batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
                   for _ in range(3)]
        plain, fast = masked_twins(mlp, batches[0][0][:2])
    else:
        batches = cnn_batches
        plain, fast = masked_twins(cnn, batches[0][0][:2])
    masks = {k: v.clone() for k, v in current_masks(plain).items()}
    plain_opt = OPTIMIZERS[name](list(plain.module.parameters()))
    fast_opt = OPTIMIZERS[name](list(fast.module.parameters()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # dropout of the cnn: the same draws in both
        plain_losses = steps(plain, plain_opt, batches, 6)
    with torch.random.fork_rng(devices=[]), fast_masks(fast, fast_opt):
        torch.manual_seed(0)
        assert not any(n.target is torch.ops.aten.mul.Tensor for n in mask_muls(fast))
        fast_losses = steps(fast, fast_opt, batches, 6)
        for pname, mask in masks.items():
            weight = fast.parameter(pname)
            assert torch.count_nonzero(weight[~mask]) == 0, pname  # pruned weights exactly 0
            for value in fast_opt.state[weight].values():  # and their optimizer state
                if value.shape == weight.shape:
                    assert torch.count_nonzero(value[~mask]) == 0, pname
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses)), (
        plain_losses, fast_losses)
    for pname, value in plain.module.named_parameters():
        mask = masks.get(pname)
        expected = value.detach() * mask if mask is not None else value.detach()
        assert torch.equal(fast.parameter(pname).detach(), expected), pname
    # after the block: the masked graph again, computing what the plain one computes
    assert all(n.target is torch.ops.aten.mul.Tensor for n in mask_muls(fast))
    assert sum(1 for _ in mask_muls(fast)) == len(masks)
    plain.eval(), fast.eval()
    x = batches[0][0]
    assert torch.equal(fast.module(x), plain.module(x))


def mask_muls(graph: chop.Graph):
    from chop.ir.masks import mask_nodes

    return mask_nodes(graph)


def test_fast_masks_zero_the_state_of_pruned_entries_on_entry_and_refresh(mlp, mlp_batches):
    """Adam with weight decay, run on the plain masked graph first, leaves moments on pruned
    entries; entering fast_masks zeroes them, and refresh() after the masks changed zeroes the
    newly pruned weights and moments."""
    graph, _ = masked_twins(mlp, mlp_batches[0][0][:2])
    optimizer = torch.optim.Adam(graph.module.parameters(), lr=0.01, weight_decay=0.1)
    steps(graph, optimizer, mlp_batches, 2)
    name, mask = next(iter(current_masks(graph).items()))
    weight = graph.parameter(name)
    assert optimizer.state[weight]["exp_avg"][~mask].any()  # weight decay moved them
    with fast_masks(graph, optimizer) as fast:
        assert not optimizer.state[weight]["exp_avg"][~mask].any()
        assert not weight[~mask].any()
        steps(graph, optimizer, mlp_batches, 2)
        chop.run(graph, "magnitude, mask{sparsity=0.95, scope=global}")  # updates the buffers
        newer = current_masks(graph)[name]
        assert (mask & ~newer).any()
        fast.refresh()
        assert not weight[~newer].any()
        for value in (optimizer.state[weight]["exp_avg"], optimizer.state[weight]["exp_avg_sq"]):
            assert not value[~newer].any()
        steps(graph, optimizer, mlp_batches, 1)
        assert not weight[~newer].any()


@pytest.mark.parametrize("criterion", ["magnitude", "snip-momentum{source=grad}",
                                       "gradient", "grasp"])
def test_fast_masks_take_up_mask_nodes_a_pruner_adds(mlp, criterion):
    """train_graph with a Pruner on an unmasked graph: the mask nodes the first pruning step
    adds are passed through too, and the records equal training without fast_masks; with a
    criterion that prunes after backward (from the step's gradients), the gradients of newly
    pruned weights are masked before the optimizer step; a criterion that reads gradients
    without the weights (gradient, and GraSP's, differentiated twice) reads the masked
    graph's, zero where pruned."""
    x, y = easy_task(64)
    twin = copy.deepcopy(mlp)
    spec = TrainSpec(lr=0.01, epochs=2, seed=0, weight_decay=0.01, prune_sparsity=0.8,
                     prune_criterion=criterion, prune_end=6, prune_frequency=2)
    fast = chop.trace(mlp, (x[:2],))
    plain = chop.trace(twin, (x[:2],))
    fast_records = train_graph(fast, (x, y), None, spec, batch_size=16)
    plain_records = train_graph(plain, (x, y), None,
                                TrainSpec(**{**spec.__dict__, "fast_masks": False}), batch_size=16)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in fast_records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in plain_records]
    masks = current_masks(plain)
    assert masks and all(torch.equal(current_masks(fast)[k], m) for k, m in masks.items())
    for name, value in plain.module.named_parameters():
        expected = value.detach() * masks[name] if name in masks else value.detach()
        assert torch.equal(fast.parameter(name).detach(), expected), name
    def saliency(graph: chop.Graph) -> dict[str, torch.Tensor]:  # pruned entries' included
        return {n.target: n.meta["chop"]["saliency"] for n in graph.weight_nodes()
                if "saliency" in n.meta.get("chop", {})}

    scores = saliency(plain)
    assert scores and all(torch.equal(saliency(fast)[k], v) for k, v in scores.items())


def second_order_steps(graph: chop.Graph, optimizer: torch.optim.Optimizer, batches,
                       count: int) -> list[torch.Tensor]:
    """Steps whose loss adds a penalty on the gradients (backward with create_graph, the
    penalty read from .grad and differentiated again): the masked gradient is in the graph."""
    losses = []
    graph.train()
    weights = [p for name, p in graph.module.named_parameters() if name.endswith("weight")]
    for i in range(count):
        x, y = batches[i % len(batches)]
        optimizer.zero_grad()
        loss = F.cross_entropy(graph.module(x), y)
        loss.backward(create_graph=True)
        penalty = sum(torch.sin(w.grad).sum() for w in weights)
        optimizer.zero_grad()
        (loss + 0.1 * penalty).backward()
        optimizer.step()
        for p in graph.module.parameters():
            p.grad = None  # backward with create_graph: break the cycle .grad <-> its graph
        losses.append(loss.detach())
    return losses


def test_fast_masks_keep_the_masked_gradient_in_a_second_order_graph(mlp, mlp_batches):
    plain, fast = masked_twins(mlp, mlp_batches[0][0][:2])
    plain_opt = torch.optim.SGD(plain.module.parameters(), lr=0.05)
    fast_opt = torch.optim.SGD(fast.module.parameters(), lr=0.05)
    expected = second_order_steps(plain, plain_opt, mlp_batches, 3)
    with fast_masks(fast, fast_opt):
        got = second_order_steps(fast, fast_opt, mlp_batches, 3)
    assert all(torch.equal(a, b) for a, b in zip(expected, got)), (expected, got)
    masks = current_masks(plain)
    for name, value in plain.module.named_parameters():
        expected = value.detach() * masks[name] if name in masks else value.detach()
        assert torch.equal(fast.parameter(name).detach(), expected), name


def test_post_accumulate_hooks_the_user_had_see_masked_gradients(mlp, mlp_batches):
    """PyTorch's optimizer step in backward: a post-accumulate-grad hook that steps each
    weight and drops its .grad, registered before fast_masks. It runs first, so fast_masks
    masks those weights' gradients before accumulation instead: pruned weights stay 0."""
    graph, _ = masked_twins(mlp, mlp_batches[0][0][:2])
    masks = {k: v.clone() for k, v in current_masks(graph).items()}
    steppers = {p: torch.optim.SGD([p], lr=0.1, momentum=0.9)
                for p in graph.module.parameters()}

    def step_in_backward(p: nn.Parameter) -> None:
        steppers[p].step()
        steppers[p].zero_grad()

    for p in graph.module.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)
    with fast_masks(graph):
        graph.train()
        for x, y in mlp_batches[:3]:
            F.cross_entropy(graph.module(x), y).backward()
        for name, mask in masks.items():
            assert graph.parameter(name).grad is None
            assert torch.count_nonzero(graph.parameter(name).detach()[~mask]) == 0, name
    assert any(state for stepper in steppers.values() for state in stepper.state.values())


class Drift(torch.optim.Optimizer):
    """Moves every weight by a constant, gradient or not: pruned weights would leave zero."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(group["lr"])


def test_fast_masks_re_mask_weights_after_other_optimizers(mlp, mlp_batches):
    plain, fast = masked_twins(mlp, mlp_batches[0][0][:2])
    masks = current_masks(plain)
    plain_losses = steps(plain, Drift(plain.module.parameters()), mlp_batches, 3)
    optimizer = Drift(fast.module.parameters())
    with fast_masks(fast, optimizer):
        fast_losses = steps(fast, optimizer, mlp_batches, 3)
        assert all(torch.count_nonzero(fast.parameter(n)[~m]) == 0 for n, m in masks.items())
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))


def test_fast_masks_train_a_frozen_masked_weight_as_the_masked_graph(mlp, mlp_batches):
    plain, fast = masked_twins(mlp, mlp_batches[0][0][:2])
    name = next(iter(current_masks(plain)))
    for graph in (plain, fast):
        graph.parameter(name).requires_grad_(False)

    def params(graph):
        return [p for p in graph.module.parameters() if p.requires_grad]

    plain_losses = steps(plain, torch.optim.Adam(params(plain), lr=0.01), mlp_batches, 3)
    optimizer = torch.optim.Adam(params(fast), lr=0.01)
    with fast_masks(fast, optimizer):
        fast_losses = steps(fast, optimizer, mlp_batches, 3)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))


def test_fast_masks_mask_a_weight_unfrozen_inside_the_block():
    """Gradual unfreezing: a masked weight frozen on entry and unfrozen after some steps had no
    gradient hook, so its pruned entries trained and the forward read them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))]
    plain = chop.run(chop.trace(model, (batches[0][0][:2],)),
                     "magnitude, mask{sparsity=0.5, scope=local}")
    fast = plain.copy()
    mask = current_masks(plain)["0.weight"]
    losses = {}
    for graph in (plain, fast):
        graph.parameter("0.weight").requires_grad_(False)
        optimizer = torch.optim.Adam(graph.module.parameters(), lr=0.05)
        with fast_masks(graph, optimizer) if graph is fast else contextlib.nullcontext():
            losses[graph] = steps(graph, optimizer, batches, 2)
            graph.parameter("0.weight").requires_grad_(True)
            losses[graph] += steps(graph, optimizer, batches, 3)
            if graph is fast:
                assert torch.count_nonzero(fast.parameter("0.weight")[~mask]) == 0
    assert all(torch.equal(a, b) for a, b in zip(losses[plain], losses[fast], strict=True))


def test_a_copy_taken_inside_fast_masks_is_the_masked_graph(mlp, mlp_batches):
    graph, _ = masked_twins(mlp, mlp_batches[0][0][:2])
    masks = current_masks(graph)
    optimizer = torch.optim.Adam(graph.module.parameters(), lr=0.01)
    with fast_masks(graph, optimizer):
        steps(graph, optimizer, mlp_batches, 1)
        best = graph.copy()  # e.g. the best model so far
    assert all(n.target is torch.ops.aten.mul.Tensor for n in mask_muls(best))
    assert all(n.target is torch.ops.aten.mul.Tensor for n in mask_muls(graph))
    x = mlp_batches[1][0]
    with torch.no_grad():
        expected = best(x)
        for name, mask in masks.items():  # what a masked graph hides: its pruned weights
            best.parameter(name)[~mask] = 1.0
        torch.testing.assert_close(best(x), expected, rtol=0, atol=0)


def test_fast_masks_leave_nothing_behind_when_entering_fails(mlp, mlp_batches, monkeypatch):
    graph, _ = masked_twins(mlp, mlp_batches[0][0][:2])
    optimizer = Drift(graph.module.parameters())
    monkeypatch.setattr(FastMasks, "_mask_weights", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError), fast_masks(graph, optimizer):
        pass
    assert not optimizer._optimizer_step_post_hooks
    assert all(n.target is torch.ops.aten.mul.Tensor for n in mask_muls(graph))
    assert all(not p._backward_hooks for p in graph.module.parameters())


@pytest.mark.parametrize(("name", "warned"), [("Adafactor", True), ("Adam", False)])
def test_fast_masks_warn_of_optimizers_that_read_whole_parameter_norms(mlp, name, warned,
                                                                        caplog):
    graph, _ = masked_twins(mlp, torch.randn(2, 16))
    optimizer = getattr(torch.optim, name)(graph.module.parameters(), lr=0.01)
    with caplog.at_level("WARNING", logger="chop"), fast_masks(graph, optimizer):
        pass
    said = [r.getMessage() for r in caplog.records if "whole-parameter norms" in r.getMessage()]
    assert len(said) == warned and all(name in m for m in said)
