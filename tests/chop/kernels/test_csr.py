"""chop.kernels.csr: the CSR form of a masked weight, the chop::csr_linear op (every kernel, the
plan that picks one per row count, any leading shape, gradients, fake kernel, opcheck), the
measured plan, the scipy check, and 2:4 detection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chop.errors import DataError, PassError
from chop.kernels import csr as sparse_ops

needs_scipy = pytest.mark.skipif(not sparse_ops.have_scipy(), reason="the scipy kernel needs scipy")
KERNEL_IDS = [pytest.param(k, id=name, marks=[needs_scipy] if name == "scipy" else [])
              for k, name in enumerate(sparse_ops.KERNELS)]


def test_to_csr_stores_exactly_the_kept_entries_in_row_major_order():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[False, True, True], [True, True, False], [False, False, False]])
    values, col, crow = sparse_ops.to_csr(weight, mask)
    assert values.tolist() == [2.0, 3.0, 4.0, 0.0]  # a kept zero is stored too
    assert col.tolist() == [1, 2, 0, 1]
    assert crow.tolist() == [0, 2, 4, 4]  # an empty last row
    assert col.dtype == crow.dtype == torch.int32  # fits: half the bytes of int64
    assert values.is_contiguous() and col.is_contiguous() and crow.is_contiguous()
    dense = torch.sparse_csr_tensor(crow, col, values, (3, 3), check_invariants=True).to_dense()
    assert torch.equal(dense, weight * mask)


def test_to_csr_detaches_and_handles_an_empty_mask():
    weight = torch.randn(4, 5, requires_grad=True)
    values, col, crow = sparse_ops.to_csr(weight, torch.zeros(4, 5, dtype=torch.bool))
    assert values.numel() == col.numel() == 0 and crow.tolist() == [0] * 5
    values, _, _ = sparse_ops.to_csr(weight, torch.ones(4, 5, dtype=torch.bool))
    assert not values.requires_grad and torch.equal(values, weight.detach().flatten())


@pytest.mark.parametrize("kernel", KERNEL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_equals_dense_forward_and_backward_at_any_leading_shape(kernel, dtype):
    torch.manual_seed(kernel)
    weight, mask = torch.randn(24, 40, dtype=dtype), torch.rand(24, 40) < 0.2
    bias = torch.randn(24, dtype=dtype)
    csr = sparse_ops.to_csr(weight, mask)
    for b in (bias, None):
        for shape in ((1, 40), (7, 40), (2, 3, 40), (0, 40), (20, 40), (3, 7, 40)):
            x = torch.randn(*shape, dtype=dtype, requires_grad=True)
            y = sparse_ops.csr_linear(x, *csr, 24, b, [kernel], [])
            reference = F.linear(x, weight * mask, b)
            assert y.is_contiguous() and y.dtype == dtype
            torch.testing.assert_close(y, reference)
            if x.numel():
                g = torch.randn_like(y)
                torch.testing.assert_close(torch.autograd.grad(y, x, g)[0],
                                           torch.autograd.grad(reference, x, g)[0])
        torch.testing.assert_close(  # the plain function, as deployable() calls it
            sparse_ops.csr_linear_forward(x.detach(), *csr, 24, b, [kernel], []),
            F.linear(x.detach(), weight * mask, b))
        for strided in (torch.randn(40, 5, dtype=dtype).t(),  # rows not contiguous
                        torch.randn(1, 80, dtype=dtype)[:, ::2]):  # one row, every other entry
            torch.testing.assert_close(sparse_ops.csr_linear(strided, *csr, 24, b, [kernel], []),
                                       F.linear(strided, weight * mask, b))
    for transposed in (False, True):
        torch.library.opcheck(torch.ops.chop.csr_linear.default,  # fake strides == real ones
                              (torch.randn(3, 40, dtype=dtype), *csr, 24, bias, [kernel], [],
                               transposed))


@pytest.mark.parametrize("kernel", KERNEL_IDS)
def test_transposed_results_have_the_same_values_in_column_major_strides(kernel):
    """transposed=True: the same values as the default, laid out as the transpose of a row-major
    (out, rows) matrix, for inputs of any strides, on the op, its fake kernel and the function."""
    torch.manual_seed(kernel)
    weight, mask, bias = torch.randn(24, 40), torch.rand(24, 40) < 0.2, torch.randn(24)
    csr = sparse_ops.to_csr(weight, mask)
    for x in (torch.randn(7, 40), torch.randn(40, 7).t(), torch.randn(2, 3, 40),
              torch.randn(40, 6).t().reshape(2, 3, 40)):
        reference = F.linear(x, weight * mask, bias)
        bound = sparse_ops.bind(*csr, (24, 40), bias, [kernel], [], True)
        for op in (sparse_ops.csr_linear, sparse_ops.csr_linear_forward, "bound"):
            y = bound(x) if op == "bound" else op(x, *csr, 24, bias, [kernel], [], True)
            torch.testing.assert_close(y, reference)
            assert y.reshape(-1, 24).t().is_contiguous() and not y.is_contiguous()
            assert y.stride() == sparse_ops.empty_result(x, 24, True).stride()
        default = sparse_ops.csr_linear(x, *csr, 24, bias, [kernel], [])
        assert default.is_contiguous() and torch.equal(default, y)


@pytest.mark.parametrize("kernel", KERNEL_IDS)
def test_a_bound_layer_computes_the_plain_function_over_the_same_storage(kernel):
    torch.manual_seed(kernel)
    weight, mask = torch.randn(24, 40, dtype=torch.float64), torch.rand(24, 40) < 0.2
    csr = sparse_ops.to_csr(weight, mask)
    for bias in (None, torch.randn(24, dtype=torch.float64)):
        layer = sparse_ops.bind(*csr, (24, 40), bias, [kernel], [])  # outside inference mode
        for shape in ((1, 40), (7, 40), (2, 3, 40), (0, 40)):
            x = torch.randn(*shape, dtype=torch.float64)
            for grad_mode in (torch.no_grad, torch.inference_mode):  # as a server calls it
                with grad_mode():
                    y = layer(x.clone())
                assert y.is_contiguous()
                torch.testing.assert_close(y, F.linear(x, weight * mask, bias), rtol=0,
                                           atol=1e-12)
    csr[0].mul_(-1)  # in place: the bound layer sees it (nothing was copied)
    ones = torch.ones(1, 40, dtype=torch.float64)
    torch.testing.assert_close(layer(ones), F.linear(ones, -weight * mask, bias))


def test_bind_rejects_what_the_op_would_reject_once_instead_of_per_call():
    csr = sparse_ops.to_csr(torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(PassError, match="bias dtype torch.float64 differs"):
        sparse_ops.bind(*csr, (4, 6), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(PassError, match="invalid kernel plan"):
        sparse_ops.bind(*csr, (4, 6), None, [0, 1], [])
    with pytest.raises(PassError, match="float32/float64"):
        sparse_ops.bind(*sparse_ops.to_csr(torch.randn(4, 6).half(),
                                           torch.ones(4, 6, dtype=torch.bool)), (4, 6))


@pytest.mark.parametrize("kernel", KERNEL_IDS)
def test_an_input_of_the_wrong_width_is_refused_not_read_past_its_end(kernel):
    weight = torch.randn(4, 64)
    mask = torch.zeros(4, 64, dtype=torch.bool)
    mask[:, -1] = True  # the last column kept: a narrower input would be read past its end
    csr = sparse_ops.to_csr(weight, mask)
    layer = sparse_ops.bind(*csr, (4, 64), None, [kernel], [])
    for features in (32, 63, 128):
        x = torch.randn(2, features)
        with pytest.raises(DataError, match=f"has {features} features, but the sparse layer's "
                                            "weight takes 64"):
            sparse_ops.csr_linear(x, *csr, 4, None, [kernel], [], False, 64)
        with pytest.raises(DataError, match=f"has {features} features"), torch.no_grad():
            layer(x)
    # a graph saved before in_features: the largest stored column index is checked instead
    for features in (32, 63):
        with pytest.raises(DataError, match="wider than its largest column index"):
            sparse_ops.csr_linear(torch.randn(2, features), *csr, 4, None, [kernel], [])
    x = torch.randn(2, 64)
    for y in (sparse_ops.csr_linear(x, *csr, 4, None, [kernel], [], False, 64),
              sparse_ops.csr_linear(x, *csr, 4, None, [kernel], [])):
        torch.testing.assert_close(y, F.linear(x, weight * mask))


def test_the_plan_picks_the_kernel_by_row_count(monkeypatch):
    """kernels=[torch-linear, torch-mm, scipy], from_rows=[3, 9]: 1–2 rows, 3–8, then 9 on."""
    plan = ([0, 1, 2], [3, 9])
    assert [sparse_ops.kernel_for(n, *plan) for n in (0, 1, 2, 3, 8, 9, 500)] == [0, 0, 0, 1, 1, 2, 2]
    assert sparse_ops.kernel_for(7, [2], []) == sparse_ops.kernel_for(7, [2], None) == 2
    assert sparse_ops.kernel_for(7, None, None) == sparse_ops.kernel_for(7, [], []) == 1  # torch-mm
    ran = []
    monkeypatch.setattr(sparse_ops, "kernel_for", lambda n, k, r: ran.append((n, k, r)) or 1)
    csr = sparse_ops.to_csr(torch.randn(5, 6), torch.ones(5, 6, dtype=torch.bool))
    sparse_ops.csr_linear(torch.randn(2, 4, 6), *csr, 5, None, *plan)
    assert ran == [(8, [0, 1, 2], [3, 9])]  # leading dims flattened into rows


@needs_scipy
def test_scipy_fallbacks_give_the_same_result(monkeypatch):
    torch.manual_seed(2)
    weight, mask, bias = torch.randn(9, 13), torch.rand(9, 13) < 0.3, torch.randn(9)
    csr = sparse_ops.to_csr(weight, mask)
    x = torch.randn(5, 13)
    reference = F.linear(x, weight * mask, bias)
    monkeypatch.setattr(sparse_ops, "_sparsetools", lambda: None)  # scipy's public API instead
    torch.testing.assert_close(sparse_ops.csr_linear(x, *csr, 9, bias, [2], []), reference)

    def no_scipy(*args):
        raise AssertionError("scipy is not installed: the plan must fall back to torch-mm")

    monkeypatch.setattr(sparse_ops, "have_scipy", lambda: False)
    monkeypatch.setattr(sparse_ops, "_scipy_times", no_scipy)
    torch.testing.assert_close(sparse_ops.csr_linear(x, *csr, 9, bias, [2], []), reference)


@pytest.mark.parametrize("scipy", [pytest.param(True, marks=needs_scipy), False])
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_the_weight_written_out_dense_holds_the_stored_entries_with_or_without_scipy(
        scipy, index, monkeypatch):
    if not scipy:
        monkeypatch.setattr(sparse_ops, "_sparsetools", lambda: None)  # torch's index_put_
    torch.manual_seed(3)
    for shape in ((9, 13), (1, 5), (6, 1), (4, 4)):
        weight, mask = torch.randn(shape, dtype=torch.float64), torch.rand(shape) < 0.4
        mask[-1] = False  # an empty last row
        values, col, crow = sparse_ops.to_csr(weight, mask)
        dense = sparse_ops.dense_weight(values, col.to(index), crow.to(index), shape)
        assert dense.dtype == torch.float64 and dense.is_contiguous()
        assert torch.equal(dense, torch.where(mask, weight, 0.0))
        assert torch.equal(dense, torch.sparse_csr_tensor(crow, col, values, shape).to_dense())


def test_bias_gradient_and_no_gradient_for_the_stored_values():
    torch.manual_seed(1)
    weight, mask = torch.randn(6, 8), torch.rand(6, 8) < 0.5
    values, col, crow = sparse_ops.to_csr(weight, mask)
    values.requires_grad_(True)
    bias = torch.randn(6, requires_grad=True)
    x = torch.randn(20, 8)
    y = sparse_ops.csr_linear(x, values, col, crow, 6, bias)
    y.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((6,), 20.0))
    assert values.grad is None  # buffers: the sparse export is for inference


def test_the_autograd_kernel_computes_only_the_gradients_asked_for_and_traces_as_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(2)
    weight, mask = torch.randn(6, 8, dtype=torch.float64), torch.rand(6, 8) < 0.5
    csr = sparse_ops.to_csr(weight, mask)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for x_grad in (False, True):
        x = torch.randn(3, 8, dtype=torch.float64, requires_grad=x_grad)
        y = sparse_ops.csr_linear(x, *csr, 6, bias)
        g = torch.randn_like(y)
        with Calls() as calls:
            grads = torch.autograd.grad(y, [x, bias] if x_grad else [bias], g)
        # the input's gradient (a sparse product) only when the input requires grad
        assert calls.ops.count("chop.csr_linear_backward") == int(x_grad)
        reference = F.linear(x, weight * mask, bias)
        expected = torch.autograd.grad(reference, [x, bias] if x_grad else [bias], g)
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want)
    with torch.no_grad():  # nothing recorded under no_grad, whatever requires grad
        assert not sparse_ops.csr_linear(x, *csr, 6, bias).requires_grad
    # tracing with inputs that require grad goes through the Autograd kernel (AOT autograd)
    torch.library.opcheck(torch.ops.chop.csr_linear.default,
                          (torch.randn(3, 8, dtype=torch.float64, requires_grad=True), *csr, 6,
                           bias, [1], []))


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's pytree, copying
def test_without_grad_plain_calls_skip_the_redispatch_but_tracing_still_records_the_op(
        monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    csr = sparse_ops.to_csr(torch.randn(4, 6), torch.rand(4, 6) < 0.5)
    calls = []
    plain = sparse_ops.csr_linear_forward
    monkeypatch.setattr(sparse_ops, "csr_linear_forward",
                        lambda *a: calls.append(1) or plain(*a))
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = sparse_ops.csr_linear(x, *csr, 4, None, [1], [], False, 6)
    assert calls == [1]  # the direct call (the registered CPU kernel is the original function)
    torch.testing.assert_close(y, plain(x, *csr, 4, None, [1], [], False, 6), rtol=0, atol=0)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return sparse_ops.csr_linear(x, *csr, 4, None, [1], [], False, 6)

    calls.clear()
    with torch.no_grad():
        program = torch.export.export(Layer(), (x,))
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = Layer()(torch.randn(3, 6))
        assert calls == [] and fake.shape == (3, 4)
        traced = torch.jit.trace(Layer(), (x,))  # records the op, then runs it
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops == [torch.ops.chop.csr_linear.default]
    assert "chop::csr_linear" in str(traced.graph)


def test_export_and_its_decomposition_keep_the_op_through_the_autograd_kernel():
    torch.manual_seed(3)
    weight, mask = torch.randn(6, 8), torch.rand(6, 8) < 0.5

    class Sparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in zip(("values", "col", "crow"), sparse_ops.to_csr(weight, mask)):
                self.register_buffer(name, t)
            self.bias = torch.nn.Parameter(torch.randn(6))  # requires grad, as the export keeps it

        def forward(self, x):
            return sparse_ops.csr_linear(x, self.values, self.col, self.crow, 6, self.bias)

    model, x = Sparse(), torch.randn(3, 8)
    program = torch.export.export(model, (x,))
    for stage in (program, program.run_decompositions()):
        ops = [n.target for n in stage.graph.nodes if n.op == "call_function"]
        assert ops == [torch.ops.chop.csr_linear.default]  # not decomposed into its kernel
        torch.testing.assert_close(stage.module()(x), F.linear(x, weight * mask, model.bias))


def test_torch_compile_runs_forward_and_backward_through_the_op_in_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(4)
    weight, mask = torch.randn(6, 8), torch.rand(6, 8) < 0.5
    csr = sparse_ops.to_csr(weight, mask)
    bias = torch.randn(6, requires_grad=True)
    seen = []

    def backend(gm, example_inputs):  # records the ops Dynamo hands on, then AOT autograd
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    @torch.compile(backend=backend, fullgraph=True)  # a graph break is an error
    def layer(x):
        return torch.tanh(sparse_ops.csr_linear(x, *csr, 6, bias))

    x = torch.randn(3, 8, requires_grad=True)
    y = layer(x)
    assert torch.ops.chop.csr_linear.default in seen
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, bias], g)
    reference = torch.tanh(F.linear(x, weight * mask, bias))
    torch.testing.assert_close(y, reference)
    for got, want in zip(grads, torch.autograd.grad(reference, [x, bias], g), strict=True):
        torch.testing.assert_close(got, want)


def test_the_fake_kernel_gives_the_output_shape_and_checks_the_plan():
    from torch._subclasses.fake_tensor import FakeTensorMode

    csr = sparse_ops.to_csr(torch.randn(5, 7), torch.ones(5, 7, dtype=torch.bool))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.chop.csr_linear(torch.empty(2, 3, 7), *csr, 5, None, [0, 1], [4])
        assert tuple(y.shape) == (2, 3, 5) and y.dtype == torch.float32
        with pytest.raises(PassError, match=r"invalid kernel plan kernels=\[0, 1\] from_rows=\[\]"):
            torch.ops.chop.csr_linear(torch.empty(2, 7), *csr, 5, None, [0, 1], [])


@pytest.mark.parametrize("kernels,from_rows", [
    ([0, 1], []), ([5], []), ([-1], []), ([0, 1], [0]), ([0, 1, 2], [8, 4]), ([0, 1, 2], [4, 4]),
    ([], [4]),
])
def test_check_plan_refuses_malformed_plans(kernels, from_rows):
    with pytest.raises(PassError, match="indices into .*torch-linear.*increasing row thresholds"):
        sparse_ops.check_plan(kernels, from_rows)


def test_check_plan_accepts_valid_plans():
    for plan in (([1], []), ([], []), (None, None), ([0, 1, 2], [2, 32]), ([3, 1], [2]),
                 ([3, 1, 4], [2, 300])):
        sparse_ops.check_plan(*plan)


def fake_timings(monkeypatch, script):
    """Make plan_kernels see ``script[rows][kernel]`` seconds; record what it timed."""
    timed = []

    def interleaved(fns, repeats, warmup, statistic):
        assert statistic == "min"  # a kernel's undisturbed cost, not the median under load
        n = sparse_ops.PLAN_ROWS[len(timed)]  # plan_kernels times the row counts in order
        timed.append((n, sorted(fns)))
        return {k: script[n][k] for k in fns}

    monkeypatch.setattr(sparse_ops, "interleaved_seconds", interleaved)
    return timed


def test_plan_kernels_keeps_each_row_counts_winner_and_switches_where_their_lines_cross(
        monkeypatch):
    script = {
        1: {"torch-linear": 1.0, "torch-mm": 1.2, "scipy": 3.0},
        4: {"torch-linear": 5.0, "torch-mm": 1.0, "scipy": 3.9},  # scipy 3.9x: still timed
        16: {"torch-linear": 9.0, "torch-mm": 2.0, "scipy": 9.0},  # scipy > 4x: dropped
        64: {"torch-mm": 4.0}, 256: {"torch-mm": 10.0},
    }
    timed = fake_timings(monkeypatch, script)
    csr = sparse_ops.to_csr(torch.randn(8, 8), torch.ones(8, 8, dtype=torch.bool))
    kernels, from_rows, times = sparse_ops.plan_kernels(
        *csr, (8, 8), candidates=["torch-linear", "torch-mm", "scipy"])
    # torch-linear leads by 0.2 at 1 row, trails by 4 at 4: the lines cross at 1 + 3 * 0.2 / 4.2
    assert (kernels, from_rows) == ([0, 1], [2])
    assert timed == [(1, ["scipy", "torch-linear", "torch-mm"]),
                     (4, ["scipy", "torch-linear", "torch-mm"]),
                     (16, ["scipy", "torch-mm"]),  # torch-linear lost by 5x at 4 rows
                     (64, ["torch-mm"]), (256, ["torch-mm"])]
    assert times[16] == {"torch-mm": 2.0, "scipy": 9.0}
    assert sparse_ops.describe_plan(kernels, from_rows) == "torch-linear below 2 rows, torch-mm from 2"


def test_plan_kernels_keeps_timing_torch_mm_however_far_behind_at_one_row(monkeypatch):
    """torch-mm's cost per row falls with the rows: 5x behind torch-mv at one row, it must still
    be timed at the larger row counts, where it wins; torch-linear, as far behind, is dropped."""
    script = {1: {"torch-mv": 1.0, "torch-mm": 5.0, "torch-linear": 5.0},
              4: {"torch-mv": 4.0, "torch-mm": 5.0}, 16: {"torch-mv": 16.0, "torch-mm": 6.0},
              64: {"torch-mv": 64.0, "torch-mm": 9.0}, 256: {"torch-mm": 21.0}}
    timed = fake_timings(monkeypatch, script)
    csr = sparse_ops.to_csr(torch.randn(8, 8), torch.ones(8, 8, dtype=torch.bool))
    kernels, from_rows, _ = sparse_ops.plan_kernels(
        *csr, (8, 8), candidates=["torch-linear", "torch-mm", "torch-mv"])
    assert [names for _, names in timed] == [["torch-linear", "torch-mm", "torch-mv"]] + [
        ["torch-mm", "torch-mv"]] * 3 + [["torch-mm"]]  # torch-mv 7x behind at 64 rows
    assert (kernels, from_rows) == ([3, 1], [6])  # lines cross at 4 + 12 * 1 / 11 rows


def test_plan_kernels_switches_back_and_forth_and_merges_equal_bands(monkeypatch):
    script = {1: {"torch-mm": 1.0, "scipy": 2.0}, 4: {"torch-mm": 2.0, "scipy": 1.0},
              16: {"torch-mm": 1.0, "scipy": 2.0}, 64: {"torch-mm": 1.0, "scipy": 2.0},
              256: {"torch-mm": 1.0, "scipy": 2.0}}
    fake_timings(monkeypatch, script)
    csr = sparse_ops.to_csr(torch.randn(8, 8), torch.ones(8, 8, dtype=torch.bool))
    kernels, from_rows, _ = sparse_ops.plan_kernels(*csr, (8, 8), candidates=["torch-mm", "scipy"])
    assert (kernels, from_rows) == ([1, 2, 1], [3, 10])  # crossings at 2.5 and 4 + 12 / 2
    sparse_ops.check_plan(kernels, from_rows)
    assert sparse_ops.describe_plan(kernels, from_rows) == (
        "torch-mm below 3 rows, scipy from 3, torch-mm from 10")


def test_torch_dense_is_timed_from_64_rows_and_takes_over_where_the_lines_cross(monkeypatch):
    """Writing the weight out costs the same at any row count: the dense product wins only
    at many rows, beyond the last timed count here (lines through 64 and 256 rows)."""
    script = {1: {"torch-mm": 1.0}, 4: {"torch-mm": 2.0}, 16: {"torch-mm": 5.0},
              64: {"torch-mm": 16.0, "torch-dense": 80.0},  # 20x behind: still timed
              256: {"torch-mm": 64.0, "torch-dense": 96.0}}
    timed = fake_timings(monkeypatch, script)
    csr = sparse_ops.to_csr(torch.randn(8, 8), torch.ones(8, 8, dtype=torch.bool))
    kernels, from_rows, _ = sparse_ops.plan_kernels(*csr, (8, 8),
                                                    candidates=["torch-mm", "torch-dense"])
    assert [names for _, names in timed] == [["torch-mm"]] * 3 + [["torch-dense", "torch-mm"]] * 2
    # torch-mm: 0.25 per row, torch-dense 1/12 per row and 32 behind at 256 rows: they cross
    # 32 / (1/4 - 1/12) = 192 rows later
    assert (kernels, from_rows) == ([1, 4], [448])
    assert sparse_ops.describe_plan(kernels, from_rows) == (
        "torch-mm below 448 rows, torch-dense from 448")
    script[256]["torch-dense"] = 128.0  # as steep as torch-mm: it never catches up
    timed.clear()
    assert sparse_ops.plan_kernels(*csr, (8, 8), candidates=["torch-mm", "torch-dense"])[:2] == (
        [1], [])
    script[256]["torch-dense"] = 48.0  # ahead at 256 rows: from where the lines cross
    timed.clear()
    kernels, from_rows, _ = sparse_ops.plan_kernels(*csr, (8, 8),
                                                    candidates=["torch-mm", "torch-dense"])
    # 64 behind at 64 rows, 16 ahead at 256: the lines cross at 64 + 192 * 64 / 80 = 217.6
    assert (kernels, from_rows) == ([1, 4], [218])


def test_plan_kernels_times_real_kernels_and_refuses_unknown_ones():
    csr = sparse_ops.to_csr(torch.randn(16, 32), torch.rand(16, 32) < 0.1)
    kernels, from_rows, times = sparse_ops.plan_kernels(*csr, (16, 32), rows=(1, 8), repeats=2)
    sparse_ops.check_plan(kernels, from_rows)
    assert set(times) == {1, 8}
    expected = ({"torch-linear", "torch-mm", "torch-mv"}
                | ({"scipy"} if sparse_ops.have_scipy() else set()))
    assert set(times[1]) == expected and all(t > 0 for t in times[1].values())
    with pytest.raises(PassError, match="unknown kernels \\['mkl'\\]"):
        sparse_ops.plan_kernels(*csr, (16, 32), candidates=["mkl"])


def test_csr_linear_refuses_mismatched_or_unsupported_dtypes():
    csr = sparse_ops.to_csr(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(DataError, match="dtype torch.float32; got x torch.float64: cast"):
        sparse_ops.csr_linear(torch.randn(2, 8, dtype=torch.float64), *csr, 4, None)
    half = sparse_ops.to_csr(torch.randn(4, 8).half(), torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(PassError, match="float32/float64 weights; got torch.float16"):
        sparse_ops.csr_linear(torch.randn(2, 8).half(), *half, 4, None)


@pytest.mark.parametrize("kernel", ["scipy", "torch-linear", "torch-mm", "torch-mv"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_a_bound_layer_refuses_an_input_of_another_dtype_whatever_its_kernel(kernel, dtype):
    """Per call, the same error on every kernel (scipy's computed in the input's dtype, or
    failed with numpy's message)."""
    if kernel == "scipy" and not sparse_ops.have_scipy():
        pytest.skip("scipy is not installed")
    csr = sparse_ops.to_csr(torch.randn(4, 8), torch.rand(4, 8) > 0.5)
    layer = sparse_ops.bind(*csr, (4, 8), kernels=[sparse_ops.KERNELS.index(kernel)])
    assert layer(torch.ones(3, 8)).dtype == torch.float32
    with pytest.raises(DataError, match=f"got x {dtype}: cast the input"):
        layer(torch.ones(3, 8, dtype=dtype))


def test_have_scipy_and_require_scipy(monkeypatch):
    import importlib.util

    assert sparse_ops.have_scipy() == (importlib.util.find_spec("scipy") is not None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    assert sparse_ops.have_scipy() is False
    monkeypatch.setattr(sparse_ops, "have_scipy", lambda: True)
    assert sparse_ops.require_scipy() is None
    monkeypatch.setattr(sparse_ops, "have_scipy", lambda: False)
    with pytest.raises(PassError, match=r"^the export needs scipy .*pip install 'chop\[sparse\]'"):
        sparse_ops.require_scipy("the export")


def test_two_four_detection_and_semi_structured_refused_off_cuda():
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert sparse_ops.is_two_four(mask)
    assert not sparse_ops.is_two_four(torch.ones(2, 8, dtype=torch.bool))
    assert not sparse_ops.is_two_four(torch.ones(2, 6, dtype=torch.bool))  # not groups of 4
    assert not sparse_ops.is_two_four(torch.zeros(2, 2, 4, dtype=torch.bool))  # not a matrix
    three = mask.clone()
    three[1, 4] = True  # the second group of row 1 keeps 3
    assert not sparse_ops.is_two_four(three)
    tensor, why = sparse_ops.semi_structured(torch.randn(2, 8), mask)
    assert (tensor, why) == (None, "2:4 semi-structured needs CUDA")
