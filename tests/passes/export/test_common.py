"""chop.passes.export.common: the export check (what it runs, what it catches) and
deployable, the graph in eval mode without per-call overheads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import chop
import zoo
from chop.errors import DataError
from chop.passes.export.common import deployable


def test_deployable_computes_the_eval_graph_and_shares_its_tensors(cnn_graph, cnn_batches):
    x = cnn_batches[1][0]
    with cnn_graph.mode(batch_norm=False, dropout=False), torch.no_grad():
        expected = cnn_graph(x)
    assert cnn_graph.training
    state = {k: v.clone() for k, v in cnn_graph.module.state_dict().items()}
    module = deployable(cnn_graph)
    assert cnn_graph.training  # the graph keeps its mode
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
        module.train()  # eval is baked in: dropout stays off, BatchNorm keeps its statistics
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    for key, value in cnn_graph.module.state_dict().items():  # running stats, counters untouched
        assert torch.equal(value, state[key]), key
    graph_tensors = {t.data_ptr() for t in cnn_graph.module.state_dict().values()}
    assert {t.data_ptr() for t in module.state_dict().values()} <= graph_tensors  # nothing copied
    nodes = list(module.graph.nodes)
    assert not any(n.op == "call_module" for n in nodes)  # no _guards_fn call
    assert not any(str(n.target).endswith("num_batches_tracked") for n in nodes)  # no counter
    with pytest.raises(RuntimeError):  # shapes are no longer guarded: an op fails instead
        module(torch.randn(2, 5, 8, 8))


def test_deployable_calls_each_sparse_layer_bound_once(mlp, mlp_batches):
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, "magnitude, mask{sparsity=0.7}, sparse{mode=all, kernel=torch-mm}")
    graph.eval()
    module = deployable(graph)
    calls = [n for n in module.graph.nodes if n.op == "call_function"]
    layers = [n for n in calls if n.target.__name__ == "sparse_linear"]
    assert len(layers) == 3 and all(len(n.args) == 1 for n in layers)  # x only: tensors bound
    assert torch.ops.chop.csr_linear.default not in [n.target for n in calls]
    assert "pytree" not in module.code  # positional tensors in, a tensor out: plain calls
    x = mlp_batches[1][0]
    with torch.inference_mode():
        for rows in (1, 8):
            expected = graph(x[:rows])
            got = module(x[:rows])
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            assert got.is_contiguous()
        values = graph.module.get_buffer("layers.0.weight_values")
        values.mul_(2)  # the bound layer reads the graph's storage: nothing was copied
        torch.testing.assert_close(module(x), graph(x), rtol=0, atol=0)
        loose = deployable(graph, contiguous_outputs=False)(x)
        torch.testing.assert_close(loose, graph(x), rtol=0, atol=0)
        assert loose.t().is_contiguous() and not loose.is_contiguous()  # the kernel's layout
    last = [n for n in graph.module.graph.nodes
            if n.target is torch.ops.chop.csr_linear.default][-1]
    last.args[0].meta.pop("val")  # its input size unknown: the layer cannot be bound ahead
    module = deployable(graph, contiguous_outputs=False)
    calls = [n for n in module.graph.nodes if n.op == "call_function"]
    assert [n.target.__name__ for n in calls if "linear" in n.target.__name__] == [
        "sparse_linear", "sparse_linear", "csr_linear_forward"]
    with torch.inference_mode():
        loose = module(x)
        torch.testing.assert_close(loose, graph(x), rtol=0, atol=0)
        assert loose.t().is_contiguous() and not loose.is_contiguous()  # output: transposed


@pytest.mark.parametrize("kernel", ["scipy", "torch-mv"])
def test_deployable_serves_without_no_grad(mlp, mlp_batches, kernel):
    """Outside no_grad the bias (a parameter) made scipy's numpy() and addmv's out= fail."""
    pytest.importorskip("scipy")
    graph = chop.trace(mlp, (mlp_batches[0][0],))
    chop.run(graph, f"magnitude, mask{{sparsity=0.7}}, sparse{{mode=all, kernel={kernel}}}")
    graph.eval()
    x = mlp_batches[1][0]
    with torch.no_grad():
        expected = graph(x)
    torch.testing.assert_close(deployable(graph)(x), expected, rtol=0, atol=0)


def test_deployable_keeps_row_major_a_returned_result_the_graph_also_reads():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 8)

        def forward(self, x):
            y = self.fc(x)
            return y, y.view(-1).sum()  # a view needs y row-major

    torch.manual_seed(0)
    x = torch.randn(4, 12)
    graph = chop.run(chop.trace(Both(), (x,)),
                     "random{seed=1}, mask{sparsity=0.8}, sparse{mode=all, kernel=torch-mm}")
    with torch.inference_mode():
        y, total = deployable(graph, contiguous_outputs=False)(x)
        expected = graph(x)
    torch.testing.assert_close((y, total), expected, rtol=0, atol=0)
    assert y.is_contiguous()


def test_deployable_serves_a_saved_pt2(mlp, mlp_batches, tmp_path):
    """The `.pt2` that `chop.save` writes, loaded back with torch.export and wrapped in a Graph,
    deploys with its sparse layers bound and computes what the saved graph does."""
    x = mlp_batches[0][0]
    graph = chop.run(chop.trace(mlp, (x,)), "magnitude, mask{sparsity=0.7}, sparse{mode=all}")
    chop.save(graph, tmp_path / "out", (x,))
    program = torch.export.load(tmp_path / "out" / "model.pt2")
    module = deployable(chop.Graph(program.module(), training=False, name="mlp"))
    calls = [getattr(n.target, "__name__", "") for n in module.graph.nodes
             if n.op == "call_function"]
    assert calls.count("sparse_linear") == 3
    with torch.inference_mode():
        for rows in (1, 5):  # any batch size, as the .pt2 takes
            y = mlp_batches[1][0][:rows]
            torch.testing.assert_close(module(y), graph.eval()(y), rtol=0, atol=0)


def test_a_saved_sparse_graph_and_its_deployable_refuse_an_input_of_the_wrong_width(
        mlp, mlp_batches, tmp_path):
    """The kernels take the CSR indices on trust: each sparse layer carries its input width
    through the `.pt2`, and the bound layers check it."""
    x = mlp_batches[0][0]
    graph = chop.run(chop.trace(mlp, (x,)), "magnitude, mask{sparsity=0.7}, sparse{mode=all}")
    chop.save(graph, tmp_path / "out", (x,))
    loaded = torch.export.load(tmp_path / "out" / "model.pt2").module()
    layers = loaded.graph.find_nodes(op="call_function", target=torch.ops.chop.csr_linear.default)
    widths = [n.args[0].meta["val"].shape[-1] for n in layers]
    assert [n.args[9] for n in layers] == widths and len(widths) == 3
    module = deployable(chop.Graph(loaded, training=False, name="mlp"))
    with torch.inference_mode(), pytest.raises(DataError, match=f"has {widths[0] - 1} features"):
        module(x[:, :-1])


def test_deployable_keeps_the_guards_of_an_input_that_export_fixed_at_its_traced_value():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    graph = chop.trace(zoo.Scaled(), (x, 2.0)).eval()
    module = deployable(graph)
    assert "_guards_fn" in module.code
    with torch.inference_mode():
        torch.testing.assert_close(module(x, 2.0), graph(x, 2.0), rtol=0, atol=0)
        with pytest.raises(AssertionError, match="scale == 2.0"):
            module(x, 3.0)  # not computed with 2.0 instead
    tensors_only = deployable(chop.trace(nn.Linear(4, 4), (x,)))
    assert "_guards_fn" not in tensors_only.code


def test_deployable_keeps_the_calling_convention_of_tuple_outputs():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(6, 3)

        def forward(self, x, y):
            return self.a(x), {"b": self.b(y), "sum": x + y}

    torch.manual_seed(0)
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    graph = chop.run(chop.trace(Two(), (x, y)), "magnitude, mask{sparsity=0.5}, sparse{mode=all}")
    module = deployable(graph.eval())
    assert "pytree" not in module.code
    with torch.inference_mode():
        expected, got = graph(x, y), module(x, y)
    assert isinstance(got, tuple) and isinstance(got[1], dict) and list(got[1]) == ["b", "sum"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_deployable_keeps_keyword_inputs_and_structured_outputs():
    import zoo

    _, graph = zoo.trace("bert")
    args, kwargs = zoo.tokens(3, 7)
    with torch.no_grad():
        expected = graph(*args, **kwargs).logits
        got = deployable(graph)(*args, **kwargs)
    assert type(got).__name__ == "SequenceClassifierOutput"
    torch.testing.assert_close(got.logits, expected, rtol=0, atol=0)
    # sparse layers bound ahead, keyword inputs, served under inference_mode (torch-linear's
    # sparse F.linear refuses a CSR tensor made outside inference mode unless chop steps out)
    chop.run(graph, "magnitude, mask{sparsity=0.8}, sparse{mode=all, kernel=torch-linear}")
    module = deployable(graph.eval())
    assert sum(getattr(n.target, "__name__", "") == "sparse_linear"
               for n in module.graph.nodes) == graph.history[-1].info["total"]["csr"] > 0
    with torch.inference_mode():
        expected = graph(*args, **kwargs).logits
        torch.testing.assert_close(module(*args, **kwargs).logits, expected, rtol=0, atol=0)


def test_the_export_check_runs_two_samples_and_still_catches_a_wrong_rewrite(cnn_graph, cnn_batches):
    from chop.passes.export.common import checked_export
    from chop.pipeline.pass_base import Context

    x = cnn_batches[0][0]
    assert x.shape[0] > 2
    seen = []
    cnn_graph.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))

    def wrong() -> None:  # a "rewrite" that changes the function
        with torch.no_grad():
            cnn_graph.parameter("fc.bias").add_(1.0)

    with pytest.raises(chop.InternalError, match="the wrong graph"):
        checked_export(cnn_graph, Context(data=[(x, None)]), wrong, False, "wrong")
    assert seen == [2, 2]
    seen.clear()
    checked_export(cnn_graph, Context(data=[(x, None)]), lambda: None, True, "timed")
    assert seen[0] == 2 and seen.count(2) == 2  # the check: two samples before and after
    assert set(seen) == {2, x.shape[0]}  # the timing: the whole batch


def _ill_conditioned() -> tuple[nn.Module, torch.Tensor]:
    """A conv + BatchNorm on inputs around 1000, with the running statistics such data leaves:
    float32 loses about four digits to cancellation, in the model and in any rewrite of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    x = 1000 + torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        z = model[0](x)
        model[1].running_mean.copy_(z.mean((0, 2, 3)))
        model[1].running_var.copy_(z.var((0, 2, 3)))
    return model.eval(), x


def test_the_export_check_tells_float32_round_off_of_an_ill_conditioned_model_from_a_bug(caplog):
    from chop.passes.export.common import ROUND_OFF_MARGIN, checked_export
    from chop.pipeline.pass_base import Context

    model, x = _ill_conditioned()
    graph = chop.trace(model, (x,))
    data = [(x, torch.zeros(4, dtype=torch.long))]
    with caplog.at_level("WARNING", logger="chop"):
        chop.run(graph, "fold-bn", data=data)  # was an InternalError: "a bug in chop"
    found = graph.history[-1].info["check_round_off"]
    assert 0 < found["difference"] <= ROUND_OFF_MARGIN * found["float32_round_off"]
    assert "it is float32 round-off" in caplog.text
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        folded = (graph.eval()(x).double() - exact).abs().max()
        assert folded <= 2 * (model(x).double() - exact).abs().max()  # as exact as the model

    def wrong() -> None:  # a real change of the function is still refused on such a model
        with torch.no_grad():
            graph.parameter("0.bias").add_(0.01)

    with pytest.raises(chop.InternalError, match="the wrong graph"):
        checked_export(graph, Context(data=data), wrong, False, "wrong")


class _Counting(nn.Module):
    """Adds to its output a buffer it bumps at every call, and writes a slice of a cache."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("cache", torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        y = self.b(torch.relu(self.a(x))) + self.calls
        self.cache[1].copy_(y[0].detach())
        return y + self.cache.sum()


@pytest.mark.parametrize("timing", [False, True])
def test_the_export_check_runs_both_forwards_on_the_same_state_and_leaves_it(timing, caplog):
    """A forward that writes buffers in place: the check's two forwards start from the same
    state, so an exact rewrite passes without a round-off warning and a wrong one is refused
    (it was waved through as round-off); the buffers end as the check found them."""
    from chop.passes.export.common import checked_export
    from chop.pipeline.pass_base import Context

    torch.manual_seed(0)
    x = torch.randn(6, 16)
    graph = chop.trace(_Counting(), (x,))
    ctx = Context(data=[(x, None)])
    state = {name: b.clone() for name, b in graph.module.named_buffers()}
    with caplog.at_level("WARNING", logger="chop"):
        _, info = checked_export(graph, ctx, lambda: None, timing, "same")
    assert "check_round_off" not in info and "round-off" not in caplog.text
    assert all(torch.equal(b, state[name]) for name, b in graph.module.named_buffers())

    def wrong() -> None:
        with torch.no_grad():
            graph.parameter("b.bias").add_(0.05)

    with pytest.raises(chop.InternalError, match="the wrong graph"):
        checked_export(graph, ctx, wrong, timing, "wrong")


class _WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x.mul_(2))))


@pytest.mark.parametrize("timing", [False, True])
def test_the_export_check_gives_each_forward_its_own_inputs(timing):
    """The second forward read inputs the first had doubled (a false "bug in chop"), and the
    user's batch came back changed."""
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    graph = chop.trace(_WritesItsInput(), (x.clone(),))
    batch = x.clone()
    chop.run(graph, f"magnitude, mask{{sparsity=0.5, granularity=channel}}, "
                    f"shrink{{timing={str(timing).lower()}}}",
             data=[(batch, None)])
    assert torch.equal(batch, x)


def _recording(graph):
    """The shapes of every input tensor each call of ``graph``'s module gets, in call order."""
    seen = []
    graph.module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append({k: tuple(v.shape) for k, v in kwargs.items()}),
        with_kwargs=True)
    return seen


def test_the_export_check_reads_sixteen_positions_of_a_token_sequence_and_still_catches():
    from chop.passes.export.common import checked_export
    from chop.pipeline.pass_base import Context

    _, graph = zoo.trace("bert")
    ids = torch.randint(0, 120, (5, 40), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seen = _recording(graph)

    def wrong() -> None:  # a "rewrite" that changes the function
        with torch.no_grad():
            graph.parameter("classifier.bias").add_(1.0)

    with pytest.raises(chop.InternalError, match="the wrong graph"):
        checked_export(graph, Context(data=[(inputs, None)]), wrong, False, "wrong")
    short = {"input_ids": (2, 16), "attention_mask": (2, 16)}
    assert seen == [short, short]
    seen.clear()
    checked_export(graph, Context(data=[(inputs, None)]), lambda: None, True, "timed")
    assert seen[0] == short and seen.count(short) == 2  # the check: two samples of 16 tokens
    whole = {"input_ids": (5, 40), "attention_mask": (5, 40)}
    assert all(s in (short, whole) for s in seen) and whole in seen  # the timing: all of it


def test_the_export_check_runs_the_batch_whole_when_the_graph_refuses_it_cut(monkeypatch):
    from chop.passes.export import common
    from chop.pipeline.pass_base import Context

    _, graph = zoo.trace("bert")
    ids = torch.randint(0, 120, (5, 40), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    refused = {"input_ids": ids[:2, :16], "attention_mask": ids[:2, :7]}  # lengths disagree
    monkeypatch.setattr(common, "cut_batch", lambda module, x: refused)
    seen = _recording(graph)
    _, info = common.checked_export(graph, Context(data=[(inputs, None)]), lambda: None, False,
                                    "same")
    whole = {"input_ids": (5, 40), "attention_mask": (5, 40)}  # the first batch as it is
    assert seen[-2:] == [whole, whole] and info["check_s"] > 0
