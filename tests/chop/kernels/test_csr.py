"""chop.kernels.csr: the CSR form of a masked weight, the chop::csr_linear op (both kernels, any
leading shape, gradients, fake kernel), the scipy check, and 2:4 detection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chop.errors import PassError
from chop.kernels import csr as sparse_ops

needs_scipy = pytest.mark.skipif(not sparse_ops.have_scipy(), reason="the CPU CSR kernel needs scipy")


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


@needs_scipy
def test_csr_linear_any_leading_shape_gradients_and_fallback(monkeypatch):
    torch.manual_seed(0)
    weight, mask, bias = torch.randn(24, 40), torch.rand(24, 40) < 0.2, torch.randn(24)
    csr = sparse_ops.to_csr(weight, mask)
    for shape in ((1, 40), (7, 40), (2, 3, 40), (0, 40), (20, 40), (3, 7, 40)):
        x = torch.randn(*shape, requires_grad=True)
        y = sparse_ops.csr_linear(x, *csr, 24, bias)
        reference = F.linear(x, weight * mask, bias)
        torch.testing.assert_close(y, reference)
        if x.numel():
            g = torch.randn_like(y)
            torch.testing.assert_close(torch.autograd.grad(y, x, g)[0],
                                       torch.autograd.grad(reference, x, g)[0])
    torch.library.opcheck(torch.ops.chop.csr_linear.default, (torch.randn(3, 40), *csr, 24, bias))
    monkeypatch.setattr(sparse_ops, "_sparsetools", lambda: None)  # scipy's public API instead
    for rows in (1, 4, 32):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(sparse_ops.csr_linear(x, *csr, 24, None), F.linear(x, weight * mask))


@needs_scipy
@pytest.mark.parametrize("rows", [1, sparse_ops.TORCH_CSR_BELOW - 1, sparse_ops.TORCH_CSR_BELOW, 40])
def test_both_kernels_agree_on_either_side_of_the_switch(rows, monkeypatch):
    """Fewer than TORCH_CSR_BELOW rows run torch's CSR matmul, more run scipy's loops."""
    scipy_calls = []
    scipy_kernel = sparse_ops._csr_times

    def spy(*args, **kwargs):
        scipy_calls.append(kwargs.get("transpose", False))
        return scipy_kernel(*args, **kwargs)

    monkeypatch.setattr(sparse_ops, "_csr_times", spy)
    g = torch.Generator().manual_seed(rows)
    weight, mask = torch.randn(9, 13, generator=g), torch.rand(9, 13, generator=g) < 0.3
    x = torch.randn(rows, 13, generator=g, dtype=torch.float64)
    csr = sparse_ops.to_csr(weight.double(), mask)
    torch.testing.assert_close(sparse_ops.csr_linear(x, *csr, 9, None), F.linear(x, (weight * mask).double()))
    assert scipy_calls == ([False] if rows >= sparse_ops.TORCH_CSR_BELOW else [])


@needs_scipy
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


def test_the_fake_kernel_gives_the_output_shape_without_computing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    csr = sparse_ops.to_csr(torch.randn(5, 7), torch.ones(5, 7, dtype=torch.bool))
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.chop.csr_linear(torch.empty(2, 3, 7), *csr, 5, None)
        assert tuple(y.shape) == (2, 3, 5) and y.dtype == torch.float32


def test_csr_linear_refuses_mismatched_or_unsupported_dtypes():
    csr = sparse_ops.to_csr(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(PassError, match="float32/float64 inputs matching the weights; got x torch.float64"):
        sparse_ops.csr_linear(torch.randn(2, 8, dtype=torch.float64), *csr, 4, None)
    half = sparse_ops.to_csr(torch.randn(4, 8).half(), torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(PassError, match="float32/float64"):
        sparse_ops.csr_linear(torch.randn(2, 8).half(), *half, 4, None)


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
