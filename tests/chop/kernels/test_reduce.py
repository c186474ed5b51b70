"""any_nonzero: equal to ``(t != 0).any(dims)`` on every layout, dtype and special value;
has_nan: equal to ``isnan(t).any()``, wherever the NaN lies."""

from __future__ import annotations

import pytest
import torch

from chop.kernels.reduce import any_nonzero, has_nan


def sample(shape, dtype):
    torch.manual_seed(0)
    float8 = dtype.is_floating_point and dtype.itemsize == 1  # no item assignment: cast at the end
    t = torch.randn(shape).to(torch.float32 if float8 else dtype)
    t[torch.rand(shape) < 0.6] = 0
    if t.is_floating_point() and t.numel() > 8:
        flat = t.view(-1)
        flat[1], flat[3], flat[5], flat[7] = float("nan"), float("inf"), -float("inf"), -0.0
    if t.dim() >= 2 and t.shape[0] > 2:
        t[2] = -0.0  # a whole slice of negative zeros holds no nonzero entry
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.int64, torch.bool])
@pytest.mark.parametrize("shape, dims", [((7, 5), 0), ((7, 5), 1), ((6, 4, 3, 3), (1, 2, 3)),
                                         ((6, 4, 3, 3), (2, 3)), ((6, 4, 3), 2), ((6, 0), 1),
                                         ((0, 5), 1), ((9,), 0)])
def test_equals_any_of_not_equal_zero(dtype, shape, dims):
    t = sample(shape, dtype)
    expected = (t != 0).any(dims)
    found = any_nonzero(t, dims)
    assert found.dtype == torch.bool and found.shape == expected.shape
    assert torch.equal(found, expected)


def test_a_transposed_view_and_a_tensor_that_requires_grad():
    t = sample((8, 6), torch.float32).requires_grad_()
    assert torch.equal(any_nonzero(t.T, 0), (t.T != 0).any(0))
    assert not any_nonzero(t, 1).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.float8_e5m2])  # (torch has no amax for float8)
@pytest.mark.parametrize("n", [1, 7, 33, 1000, 70_001])  # vector tails and several threads' chunks
def test_has_nan_wherever_it_lies(dtype, n):
    t = torch.randn(n)
    t[0] = float("inf")
    assert not has_nan(t.to(dtype)) and not has_nan((-t).to(dtype))
    for i in {0, n // 2, n - 1}:
        u = t.clone()
        u[i] = float("nan")
        assert has_nan(u.to(dtype)) and has_nan((-u).to(dtype))
        assert has_nan(u.to(dtype).view(1, n).T)  # a strided view too


def test_has_nan_of_infinities_empty_and_integer_tensors():
    assert not has_nan(torch.tensor([float("inf"), -float("inf")]))  # inf − inf is not in t
    assert not has_nan(torch.empty(0)) and not has_nan(torch.arange(5))
    assert has_nan(torch.tensor([[1.0, float("nan")]], requires_grad=True))
