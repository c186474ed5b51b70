"""Sparse weight kernels used by the ``sparse`` export pass.

``torch.ops.chop.csr_linear(x, values, col_indices, crow_indices, out_features, bias)`` computes
``x @ W.T + bias`` for a weight ``W`` of shape ``(out_features, x.shape[-1])`` stored in CSR form
(three plain tensors, so they are buffers in ``state_dict``). ``x`` may have any leading shape.

Two kernels, chosen per call by the number of input rows (measured on this project's 2-core
machine, quiet): for fewer than :data:`TORCH_CSR_BELOW` rows torch's own CSR matmul, which is
multi-threaded, is fastest (12.8× / 50× faster than dense at 95% / 99% sparsity, 4096×4096,
batch 1); for more rows scipy's compiled ``csr_matvecs`` walks each row's non-zeros once for all
inputs and wins (2.0× / 8.5× against torch CSR's 1.2× / 5.6× at 64 rows). scipy is an optional
extra (``pip install 'chop[sparse]'``). Under heavy contention torch's threads stall on each
other and its CSR kernel degrades more than scipy's single-threaded loop.
It is a ``torch.library.custom_op`` with a fake implementation, so graphs holding it still
export with torch.export and run under FakeTensor; loading such a ``.pt2`` needs this module
imported (``import chop.kernels.csr``) so the op is registered.

Autograd: the gradient flows to ``x`` and ``bias`` (so layers before a sparse layer can still
train); the stored non-zero values are buffers and get no gradient — the sparse export is for
inference, train before exporting.

On CUDA, 2:4 semi-structured weights can instead use :func:`torch.sparse.to_sparse_semi_structured`
(see :func:`semi_structured`).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch

from chop.errors import PassError

CSR_OP = "chop::csr_linear"


def have_scipy() -> bool:
    """True when scipy (the CPU CSR kernel) can be imported."""
    return importlib.util.find_spec("scipy") is not None


def require_scipy(who: str = "the sparse pass") -> None:
    """Raise :class:`PassError` with the install command when scipy is missing."""
    if not have_scipy():
        raise PassError(
            f"{who} needs scipy for its CPU CSR kernel, which is not installed; install it with "
            "`pip install 'chop[sparse]'` (or `pip install scipy`)"
        )


def to_csr(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, col_indices, crow_indices)`` of ``weight`` at the positions ``mask`` keeps.

    Exactly ``mask.sum()`` entries are stored (a kept weight that happens to be 0 is stored too),
    in row-major order. Indices are int32 when they fit (half the bytes of int64), else int64.
    """
    rows, cols = mask.nonzero(as_tuple=True)
    index = torch.int32 if max(mask.numel(), 1) < 2**31 else torch.int64
    counts = torch.bincount(rows, minlength=mask.shape[0])
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    values = weight.detach()[rows, cols].contiguous()
    return values, cols.to(index).contiguous(), crow.to(index).contiguous()


def _sparsetools() -> Any:
    """scipy's compiled CSR routines: the private ``_sparsetools`` module when present (it skips
    ~10 µs of Python validation per call, which matters at batch 1), else None."""
    try:
        from scipy.sparse import _sparsetools

        _sparsetools.csr_matvec, _sparsetools.csr_matvecs, _sparsetools.csc_matvecs
        return _sparsetools
    except (ImportError, AttributeError):
        return None


def _csr_times(
    values: torch.Tensor, col: torch.Tensor, crow: torch.Tensor, shape: tuple[int, int],
    dense: torch.Tensor, *, transpose: bool = False,
) -> torch.Tensor:
    """``W @ dense`` (or ``W.T @ dense``) for ``W`` of ``shape`` in CSR form; ``dense`` is
    ``(k,)`` or ``(k, n)``. Runs scipy's single-threaded compiled loops."""
    rows, cols = shape
    out_rows = cols if transpose else rows
    x = dense.detach().contiguous().numpy()
    data, indices, indptr = values.detach().numpy(), col.numpy(), crow.numpy()
    tools = _sparsetools()
    if tools is None:
        import scipy.sparse

        matrix = scipy.sparse.csr_matrix((data, indices, indptr), shape=shape, copy=False)
        return torch.from_numpy((matrix.T if transpose else matrix) @ x)
    y = torch.zeros((out_rows, *x.shape[1:]), dtype=dense.dtype)
    out = y.numpy()
    if transpose:  # the CSR arrays of W are the CSC arrays of W.T
        tools.csc_matvecs(cols, rows, x.shape[1] if x.ndim == 2 else 1, indptr, indices, data, x, out)
    elif x.ndim == 1:
        tools.csr_matvec(rows, cols, indptr, indices, data, x, out)
    else:
        tools.csr_matvecs(rows, cols, x.shape[1], indptr, indices, data, x, out)
    return y


def _check(x: torch.Tensor, values: torch.Tensor) -> None:
    if x.device.type != "cpu" or values.device.type != "cpu":
        raise PassError(
            f"chop.csr_linear is a CPU kernel; got x on {x.device} and weights on "
            f"{values.device}: run the sparse graph on CPU (on CUDA use 2:4 semi-structured "
            "weights instead)"
        )
    if x.dtype != values.dtype or x.dtype not in (torch.float32, torch.float64):
        raise PassError(
            f"chop.csr_linear supports float32/float64 inputs matching the weights; got x "
            f"{x.dtype} and weights {values.dtype}: cast the input, or keep this layer dense"
        )


# Below this many input rows torch's own CSR matmul (multi-threaded) beats scipy's loops; from
# it on scipy's csr_matvecs wins (4096x4096 at 95%/99%, 2 threads, quiet machine: torch 12.8x /
# 50x faster than dense at 1 row, scipy 2.0x / 8.5x vs torch 1.2x / 5.6x at 64 rows).
TORCH_CSR_BELOW = 16
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@torch.library.custom_op(CSR_OP, mutates_args=())
def csr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    crow_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` ``(out_features, in_features)`` in CSR form (torch's CSR
    kernel for a few rows, scipy's for more)."""
    _check(x, values)
    lead, features = x.shape[:-1], x.shape[-1]
    rows = x.detach().reshape(-1, features)
    shape = (out_features, features)
    if rows.shape[0] < TORCH_CSR_BELOW:  # few rows: torch's multi-threaded CSR kernel is faster
        weight = torch.sparse_csr_tensor(
            crow_indices, col_indices, values.detach(), shape, check_invariants=False
        )
        y = torch.nn.functional.linear(rows, weight)
    else:  # W @ x.T: scipy's csr_matvecs walks each row's non-zeros once for all inputs
        y = _csr_times(values, col_indices, crow_indices, shape, rows.t()).t().contiguous()
    if bias is not None:
        y += bias.detach()
    return y.reshape(*lead, out_features)


@csr_linear.register_fake
def _(x, values, col_indices, crow_indices, out_features, bias=None):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("chop::csr_linear_backward", mutates_args=())
def csr_linear_backward(
    grad: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    crow_indices: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``grad @ W`` for ``W`` in CSR form: the gradient of :func:`csr_linear` w.r.t. ``x``."""
    _check(grad, values)
    out_features = grad.shape[-1]
    rows = grad.detach().reshape(-1, out_features)
    shape = (out_features, in_features)
    y = _csr_times(values, col_indices, crow_indices, shape, rows.t(), transpose=True)
    y = y.t().contiguous()
    return y.reshape(*grad.shape[:-1], in_features)


@csr_linear_backward.register_fake
def _(grad, values, col_indices, crow_indices, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, values, col, crow, _, bias = inputs
    ctx.save_for_backward(values, col, crow)
    ctx.in_features = x.shape[-1]
    ctx.has_bias = bias is not None


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    values, col, crow = ctx.saved_tensors
    grad_x = csr_linear_backward(grad, values, col, crow, ctx.in_features)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, grad_bias


csr_linear.register_autograd(_backward, setup_context=_setup)


# -- CUDA 2:4 semi-structured -------------------------------------------------------------------


def is_two_four(mask: torch.Tensor) -> bool:
    """True when every group of 4 consecutive entries along the input (last) dim keeps ≤ 2."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all())


def semi_structured(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """``(tensor, "")`` with ``weight * mask`` as a 2:4 semi-structured CUDA tensor, or
    ``(None, reason)`` when the device, dtype, pattern or shape does not allow it."""
    if weight.device.type != "cuda":
        return None, "2:4 semi-structured needs CUDA"
    convert = getattr(torch.sparse, "to_sparse_semi_structured", None)
    if convert is None:
        return None, "this torch has no torch.sparse.to_sparse_semi_structured"
    if not is_two_four(mask):
        return None, "the mask is not 2:4 along the input dim"
    try:
        return convert(weight.detach() * mask.to(weight.device)), ""
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:  # dtype, shape, GPU
        return None, f"to_sparse_semi_structured refused: {str(e).splitlines()[0] if str(e) else e}"


# -- timing --------------------------------------------------------------------------------------
