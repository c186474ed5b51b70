"""any_nonzero: equal to ``(t != 0).any(dims)`` on every layout, dtype and special value."""

from __future__ import annotations

import pytest
import torch

from chop.kernels.reduce import any_nonzero


def sample(shape, dtype):
    torch.manual_seed(0)
    t = torch.randn(shape).to(dtype)
    t[torch.rand(shape) < 0.6] = 0
    if t.is_floating_point() and t.numel() > 8:
        flat = t.view(-1)
        flat[1], flat[3], flat[5], flat[7] = float("nan"), float("inf"), -float("inf"), -0.0
    if t.dim() >= 2 and t.shape[0] > 2:
        t[2] = -0.0  # a whole slice of negative zeros holds no nonzero entry
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int64, torch.bool])
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
