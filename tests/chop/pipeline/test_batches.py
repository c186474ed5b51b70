"""chop.pipeline.batches: calling a model on a batch's inputs, finding logits, the default loss,
taking batches, turning data and loss failures into DataError, comparing two outputs, and
cutting a batch to the samples a comparison runs."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chop
import zoo
from chop.errors import DataError, InternalError, OptionError
from chop.pipeline.batches import (
    batch_loss,
    call,
    check_same_outputs,
    cross_entropy,
    cut_batch,
    describe,
    expected_inputs,
    logits_of,
    take,
)


def record(*args, **kwargs):
    return args, kwargs


def test_call_spreads_tuples_and_dicts():
    x, y = torch.ones(2), torch.zeros(2)
    assert call(record, x) == ((x,), {})
    assert call(record, (x, y)) == ((x, y), {})
    assert call(record, [x, y]) == ((x, y), {})
    assert call(record, {"input_ids": x, "mask": y}) == ((), {"input_ids": x, "mask": y})


def test_call_runs_a_real_graph(mlp, mlp_batches):
    import chop

    graph = chop.trace(mlp, (mlp_batches[0][0],))
    x = mlp_batches[1][0]
    torch.testing.assert_close(call(graph.module, x), mlp(x))
    torch.testing.assert_close(call(graph.module, (x,)), mlp(x))
    torch.testing.assert_close(call(mlp, {"x": x}), mlp(x))  # keyword inputs


def test_logits_of_each_output_form():
    t = torch.randn(2, 3)
    Output = namedtuple("Output", "logits hidden")

    class WithNone:
        logits = None

    assert logits_of(t) is t
    assert logits_of(Output(t, None)) is t
    assert logits_of({"loss": torch.zeros(()), "logits": t}) is t
    assert logits_of((t, torch.zeros(1))) is t
    assert logits_of([t]) is t
    for bad in (WithNone(), {"scores": t}, (), ("text", t), 3):
        with pytest.raises(DataError, match=r"cannot find logits .*pass loss=callable"):
            logits_of(bad)


def test_cross_entropy_matches_torch_and_flattens_sequences():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(4, 5, generator=g), torch.tensor([0, 4, 2, 1])
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    torch.testing.assert_close(cross_entropy({"logits": logits}, targets),
                               F.cross_entropy(logits, targets))
    seq = torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[1, -100, 3], [-100, 0, 4]])
    keep = labels.flatten() != -100
    expected = F.cross_entropy(seq.flatten(0, 1)[keep], labels.flatten()[keep])
    torch.testing.assert_close(cross_entropy(seq, labels), expected)  # -100 ignored


def test_cross_entropy_refuses_unusable_targets():
    logits = torch.randn(4, 5)
    with pytest.raises(DataError, match=r"needs integer class targets as a tensor, got list"):
        cross_entropy(logits, [0, 1, 2, 3])
    with pytest.raises(DataError, match=r"logits of shape \(4, 5\) do not match targets of shape \(3,\)"):
        cross_entropy(logits, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("targets", [torch.randn(4), torch.rand(4, 5)])
def test_cross_entropy_refuses_float_targets(targets):
    """Hole 6: float regression targets silently used cross-entropy (soft labels of the logits'
    shape were accepted as probabilities)."""
    with pytest.raises(DataError, match=r"^the targets are float32\[4.*\], but the default loss is "
                                        r"cross-entropy over integer class indices; for regression "
                                        r"or soft labels pass loss=callable\(outputs, targets\), "
                                        r"e\.g\. loss=torch\.nn\.functional\.mse_loss$"):
        cross_entropy(torch.randn(4, 5), targets)


@pytest.mark.parametrize(("targets", "bad"), [([0, 4, 10, 1], 10), ([0, -3, 2, 1], -3)])
def test_cross_entropy_refuses_labels_out_of_range(targets, bad):
    """Hole 6: out-of-range labels gave torch's "IndexError: Target 10 is out of bounds"."""
    with pytest.raises(DataError, match=rf"^the targets hold class {bad}, but the model outputs 5 "
                                        r"classes \(logits float32\[4, 5\]\): class targets must "
                                        r"be in \[0, 5\), or -100 to ignore a position\. Fix the "
                                        r"labels, or build the model with as many outputs as classes$"):
        cross_entropy(torch.randn(4, 5), torch.tensor(targets))
    seq = torch.randn(2, 3, 5)
    ignored = torch.tensor([[1, -100, 4], [-100, 0, 2]])  # -100 is not a class: ignored
    assert torch.isfinite(cross_entropy(seq, ignored))


def test_take_yields_pairs_and_checks_them():
    data = [(torch.ones(1), 0), [torch.zeros(1), 1], (torch.ones(1), 2)]
    got = list(take(data, 2, "snip"))
    assert [t for _, t in got] == [0, 1] and all(isinstance(b, tuple) for b in got)
    assert len(list(take(iter(data), 3, "snip"))) == 3  # any iterable
    with pytest.raises(DataError, match=r"^snip needs data: pass data=\.\.\. to chop\.run"):
        list(take(None, 1, "snip"))
    with pytest.raises(DataError, match=r"^snip: batch 1 is a Tensor, not an \(inputs, targets\) pair"):
        list(take([(1, 2), torch.ones(2)], 2, "snip"))
    with pytest.raises(DataError, match=r"^snip: batch 0 is a tuple"):
        list(take([(1, 2, 3)], 1, "snip"))
    with pytest.raises(DataError, match=r"^grasp asked for 4 batches but data gave 3; lower"):
        list(take(data, 4, "grasp"))


def test_take_reads_no_more_than_it_needs():
    seen = []

    def stream():
        for i in range(10):
            seen.append(i)
            yield torch.ones(1), i

    assert len(list(take(stream(), 2, "snip"))) == 2
    assert seen == [0, 1]


def test_batch_loss_default_and_custom_losses(mlp, mlp_batches):
    x, y = mlp_batches[0]
    value = batch_loss(mlp, x, y, None, "snip")
    torch.testing.assert_close(value, F.cross_entropy(mlp(x), y))
    halved = batch_loss(mlp, x, y, None, "snip", transform=lambda out: out / 2)
    torch.testing.assert_close(halved, F.cross_entropy(mlp(x) / 2, y))
    mse = batch_loss(mlp, x, torch.zeros(8, 4), lambda out, t: F.mse_loss(out, t), "snip")
    torch.testing.assert_close(mse, F.mse_loss(mlp(x), torch.zeros(8, 4)))


def test_batch_loss_model_failure_is_a_data_error_with_the_cause(mlp, mlp_batches):
    _, y = mlp_batches[0]
    with pytest.raises(DataError, match=r"^snip: the model failed on a batch of the data "
                                        r"\(RuntimeError: .*\)\. The batch's inputs are "
                                        r"float32\[8, 7\]\. Give every batch") as info:
        batch_loss(mlp, torch.randn(8, 7), y, None, "snip")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_batch_loss_says_to_give_inputs_of_the_weights_dtype(mlp, mlp_batches):
    """float16 data for a float32 model: the message asked for the dtypes it was traced with,
    which were the data's own."""
    x, y = mlp_batches[0]
    graph = chop.trace(mlp, x.half())
    with pytest.raises(DataError, match=r"The batch's inputs are float16\[8, 16\]; the model "
                       r"was traced with x: float16\[batch, 16\]\. The model's weights are "
                       r"float32: give float32 inputs"):
        batch_loss(graph, x.half(), y, None, "snip")
    graph = chop.trace(mlp, (x * 10).long())  # features saved as integers
    with pytest.raises(DataError, match=r"The inputs are integers and the model's weights "
                       r"float32: if they are features, not token ids, give float32 inputs"):
        batch_loss(graph, (x * 10).long(), y, None, "snip")


def test_batch_loss_names_the_shape_a_graph_was_traced_with(mlp, mlp_batches):
    """Hole 6: a wrong input shape gave only torch's guard message."""
    x, y = mlp_batches[0]
    graph = chop.trace(mlp, x)
    assert expected_inputs(graph.module) == expected_inputs(graph) == "x: float32[batch, 16]"
    assert expected_inputs(mlp) is None  # not a traced module
    for module in (graph.module, graph):  # scoring calls the Graph, whose call is quicker
        message = (r"^snip: the model failed on a batch of the data \(.*\)\. The batch's inputs "
                   r"are float32\[8, 7\]; the model was traced with x: float32\[batch, 16\]\. "
                   r"Give every batch .*only the batch size may differ\)$")
        with pytest.raises(DataError, match=message) as info:
            batch_loss(module, torch.randn(8, 7), y, None, "snip")
        assert info.value.__cause__ is not None


def test_batch_loss_loss_failure_is_a_data_error_with_the_cause(mlp, mlp_batches):
    x, y = mlp_batches[0]
    with pytest.raises(DataError, match=r"^the targets hold class 1[0-3], but the model outputs 4"):
        batch_loss(mlp, x, y + 10, None, "snip")  # class 10+ of 4

    def broken(outputs, targets):
        raise KeyError("labels")

    with pytest.raises(DataError, match=r"^snip: the loss raised KeyError: 'labels'\. Check the "
                                        r"targets \(int64\[8\]\) and the loss function$") as info:
        batch_loss(mlp, x, y, broken, "snip")
    assert isinstance(info.value.__cause__, KeyError)


def test_batch_loss_lets_chop_errors_through_unwrapped(mlp, mlp_batches):
    x, y = mlp_batches[0]
    mine = OptionError("already a user error")

    def raising(*args):
        raise mine

    with pytest.raises(OptionError) as info:
        batch_loss(raising, x, y, None, "snip")
    assert info.value is mine
    with pytest.raises(OptionError) as info:
        batch_loss(mlp, x, y, raising, "snip")
    assert info.value is mine


def test_batch_loss_must_be_a_scalar_tensor(mlp, mlp_batches):
    x, y = mlp_batches[0]
    with pytest.raises(DataError, match=r"the loss must return a scalar tensor, got Tensor\(8,\)"):
        batch_loss(mlp, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"), "snip")
    with pytest.raises(DataError, match=r"got float\(\)"):
        batch_loss(mlp, x, y, lambda out, t: 1.0, "snip")


def test_describe():
    assert describe(torch.zeros(2, 3)) == "float32[2, 3]"
    assert describe({"ids": torch.zeros(2, 5, dtype=torch.long), "n": 3}) == "{ids: int64[2, 5], n: int}"
    assert describe((torch.zeros(1, dtype=torch.bool), [torch.zeros(())])) == "(bool[1], (float32[]))"


def test_check_same_outputs_accepts_round_off_relative_to_the_scale():
    big = torch.tensor([1000.0, 0.001, -500.0])
    check_same_outputs("x", big + torch.tensor([0.0, 0.05, 0.0]), big)  # 0.05 <= 1e-4 * 1000
    check_same_outputs("x", {"a": big, "b": (torch.arange(3),)},
                       {"a": big.clone(), "b": (torch.arange(3),)})
    nan = torch.tensor([math.nan, 1.0])
    check_same_outputs("x", nan.clone(), nan)  # NaN meets NaN
    check_same_outputs("x", torch.zeros(3), torch.zeros(3))
    check_same_outputs("x", torch.full((2,), math.nan), torch.full((2,), math.nan))


@pytest.mark.parametrize(("got", "expected", "problem"), [
    (torch.tensor([1000.0, 0.2]), torch.tensor([1000.0, 0.0]),
     r"output 0 differs by up to 0\.2 \(the output's scale is 1e\+03, tolerance 0\.0001 of it\)"),
    (torch.tensor([1e-3]), torch.tensor([0.0]), r"output 0 differs by up to 0\.001"),
    (torch.tensor([0.00101, 0.0]), torch.tensor([0.001, 0.0]),  # 1% of a small output's scale
     r"output 0 differs by up to 1e-05 \(the output's scale is 0\.001"),
    (torch.tensor([math.nan, 1.0]), torch.tensor([0.0, 1.0]), r"output 0 has NaN where the original has none"),
    (torch.tensor([0.0, 1.0]), torch.tensor([math.nan, 1.0]), r"output 0 has NaN"),
    (torch.zeros(2, 3), torch.zeros(3, 2), r"output 0 has shape \(2, 3\) instead of \(3, 2\)"),
    ((torch.zeros(1), torch.arange(3)), (torch.zeros(1), torch.tensor([0, 1, 3])),
     r"output 1 \(integer\) differs"),
    ((torch.zeros(1),), (torch.zeros(1), torch.zeros(1)), r"1 outputs instead of 2"),
])
def test_check_same_outputs_raises_internal_error_on_a_real_difference(got, expected, problem):
    with pytest.raises(InternalError, match=r"^model\.pt2 does not reproduce the pruned graph's "
                                            r"outputs: " + problem + r".*This is a bug in chop"):
        check_same_outputs("model.pt2", got, expected)


def test_check_same_outputs_allows_half_precision_round_off_only():
    y = torch.tensor([2.75, 1.0], dtype=torch.bfloat16)
    check_same_outputs("x", y + torch.tensor([0.0078, 0.0], dtype=torch.bfloat16), y)  # ~1 eps
    with pytest.raises(InternalError, match=r"tolerance 0\.031 of it"):
        check_same_outputs("x", y + torch.tensor([0.25, 0.0], dtype=torch.bfloat16), y)
    with pytest.raises(InternalError, match=r"tolerance 0\.0001 of it"):  # float32 stays strict
        check_same_outputs("x", y.float() + torch.tensor([0.0078, 0.0]), y.float())


def test_check_same_outputs_tolerance_is_adjustable():
    check_same_outputs("x", torch.tensor([1.01]), torch.tensor([1.0]), rtol=0.02)
    with pytest.raises(InternalError):
        check_same_outputs("x", torch.tensor([1.01]), torch.tensor([1.0]), rtol=0.005)


def test_cut_batch_leaves_inputs_that_are_not_the_graphs_and_static_sizes(cnn_graph):
    x = torch.randn(5, 3, 8, 8)
    assert cut_batch(cnn_graph.module, x).shape[0] == 2
    assert cut_batch(cnn_graph.module, (x, torch.randn(4)))[0].shape[0] == 5  # not its inputs
    assert cut_batch(cnn_graph.module, x[:2]).shape[0] == 2
    placeholder = next(iter(cnn_graph.module.graph.find_nodes(op="placeholder")))
    placeholder.meta["val"] = torch.empty(5, 3, 8, 8)  # as if the batch size were static
    assert cut_batch(cnn_graph.module, x).shape[0] == 5


def test_cut_batch_keeps_a_sequence_as_long_as_the_graph_needs():
    class AtLeast20(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)

        def forward(self, ids):
            torch._check(ids.shape[1] >= 20)
            return self.fc(self.emb(ids)).mean(1)

    ids = torch.randint(0, 50, (2, 30))
    graph = chop.trace(AtLeast20(), (ids,))
    assert cut_batch(graph.module, ids).shape == (2, 20)  # the smallest length it accepts
    assert cut_batch(graph.module, ids[:, :18]).shape == (2, 18)  # never longer than given
    assert cut_batch(graph.module, ids, positions=False).shape == (2, 30)  # samples only
    images = torch.randn(2, 3, 8, 8)
    _, cnn = zoo.trace("vgg")
    assert cut_batch(cnn.module, images) is images  # static sizes: nothing to cut
