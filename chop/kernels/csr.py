"""Sparse weight kernels used by the ``sparse`` export pass.

``torch.ops.chop.csr_linear(x, values, col_indices, crow_indices, out_features, bias, kernels,
from_rows, transposed, in_features)`` computes ``x @ W.T + bias`` for a weight ``W`` of shape
``(out_features, in_features)`` stored in CSR form (three plain tensors, so they are buffers in
``state_dict``). ``x`` may have any leading shape and any strides; its last dim must be
``in_features`` (a :class:`~chop.errors.DataError` otherwise: the kernels take the CSR indices on
trust, and a narrower input would be read past its end). Without ``in_features`` (graphs saved
before it existed) the largest column index is checked against ``x`` at each call instead.

Layout: the CSR kernels compute ``W @ x.T``, an ``(out_features, rows)`` matrix; they read ``x``
in either layout at the same speed. By default the result is copied into the usual row-major
``(rows, out_features)`` layout. With ``transposed=True`` it is returned as the transpose of that
matrix (the same values, column-major strides; the fake kernel gives the same strides), which
skips that copy. The ``sparse`` export sets it where every reader of the result accepts any
strides (:mod:`chop.passes.export.sparse`). On a 4096×4096 layer at 99%
sparsity and 32 rows, the copy costs about a fifth of the product (``bench_sparse.py`` prints
the copy's time).

Five CPU kernels (:data:`KERNELS`), none of which wins everywhere (4096×4096, 2 threads):

- ``torch-linear``: ``F.linear(x, W_csr, bias)``, torch's CSR kernel on ``x @ W.T``; fast at
  one row, far slower than the others from a few rows on;
- ``torch-mm``: ``(W_csr @ x.T).T`` (``torch.addmm``), multi-threaded, the fastest from a few
  rows on;
- ``torch-mv``: one ``torch.addmv(bias, W_csr, row)`` per input row, written into the output;
  torch's sparse matrix-vector kernel beats ``torch-mm`` on one row (``bench_sparse.py``
  prints each kernel's time there) and loses from a handful of rows on;
- ``scipy``: scipy's compiled single-threaded ``csr_matvecs`` (an optional extra, ``pip install
  'chop[sparse]'``), which walks each row's non-zeros once for all inputs and sometimes wins at
  many rows, or when other processes hold the cores;
- ``torch-dense``: the weight written out dense for the call (zeros, then the stored entries
  put in place; freed after it), then ``F.linear``. The sparse products cost the same per
  stored entry at any row count, where a dense product gets cheaper per entry as rows grow: at
  hundreds of rows (a transformer's batch times its sequence) a layer 80% sparse runs 2–3×
  slower in CSR than dense, and writing the weight out (tens of ms for 4096×4096) is cheaper
  than that. It costs one dense weight of memory while it runs.

Which one runs is the op's *plan*: ``kernels[i]`` (an index into :data:`KERNELS`) runs when the
input has at least ``from_rows[i - 1]`` and fewer than ``from_rows[i]`` rows (``len(kernels) ==
len(from_rows) + 1``; no plan means ``torch-mm``). The plan is an argument of the op, so a graph
or a ``.pt2`` carries it and needs nothing else. :func:`plan_kernels` measures the kernels on one
weight and returns its plan; the ``sparse`` export stores one per layer. The CSR tensor itself
is rebuilt on each call from the three buffers, without copies or validation (~2 µs): torch.export
cannot serialise sparse buffers.

It is a custom op (``torch.library.define`` + ``impl``) with a fake implementation and an
autograd formula, so graphs holding it still export with torch.export and run under FakeTensor;
loading such a ``.pt2`` needs this module imported (``import chop``) so the op is registered. A
plan naming ``scipy`` runs ``torch-mm`` where scipy is not installed (same result). Each call
through the dispatcher costs ~8 µs more than calling :func:`csr_linear_forward` directly, and
that function rebuilds the CSR tensor and checks its input; :func:`bind` does both once per
layer, for :func:`chop.passes.export.common.deployable` (``bench_sparse.py`` prints each
cost).

Autograd: the gradient flows to ``x`` and ``bias`` (so layers before a sparse layer can still
train), each only when it requires grad; the stored non-zero values are buffers and get no
gradient — the sparse export is for inference, train before exporting. The Autograd kernel is
written out (:func:`_autograd_kernel`), not made by ``torch.library.register_autograd``: with a
trainable bias, as the export keeps it, a call costs about 0.7× as much as through that generic
kernel (``bench_sparse.py`` prints both).

On CUDA, 2:4 semi-structured weights can instead use :func:`torch.sparse.to_sparse_semi_structured`
(see :func:`semi_structured`).
"""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from chop.errors import DataError, PassError
from chop.kernels.timing import interleaved_seconds

CSR_OP = "chop::csr_linear"
# A plan's kernel ids index this tuple: append new kernels, never reorder (saved plans hold ids).
KERNELS = ("torch-linear", "torch-mm", "scipy", "torch-mv", "torch-dense")
TORCH_LINEAR, TORCH_MM, SCIPY, TORCH_MV, TORCH_DENSE = range(5)
PLAN_ROWS = (1, 4, 16, 64, 256)  # row counts plan_kernels times (see plan_kernels)
_TIMED_FROM = {"torch-dense": 64}  # kernels timed only from these row counts (see plan_kernels)
_FEW_REPEATS = 3  # repeats of a timing from _MANY_ROWS rows on (each call costs 0.1-1 s there)
_MANY_ROWS = 256
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def have_scipy() -> bool:
    """True when scipy (the ``scipy`` CSR kernel) can be imported."""
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
    ~10 µs of Python validation per call), else None."""
    try:
        from scipy.sparse import _sparsetools
    except ImportError:
        return None
    return _sparsetools if hasattr(_sparsetools, "csr_matvecs") else None


def _scipy_times(values: torch.Tensor, col: torch.Tensor, crow: torch.Tensor,
                 shape: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
    """``W @ rows.T`` (row-major, ``(out, n)``) for ``W`` of ``shape`` in CSR form, by scipy's
    single-threaded loops."""
    x = rows.t().contiguous().numpy()  # (in, n): csr_matvecs computes W @ x
    data, indices, indptr = values.numpy(), col.numpy(), crow.numpy()
    tools = _sparsetools()
    if tools is None:
        import scipy.sparse

        matrix = scipy.sparse.csr_matrix((data, indices, indptr), shape=shape, copy=False)
        return torch.from_numpy(matrix @ x)
    y = torch.zeros(shape[0], x.shape[1], dtype=rows.dtype)
    tools.csr_matvecs(shape[0], shape[1], x.shape[1], indptr, indices, data, x, y.numpy())
    return y


def _check(x: torch.Tensor, values: torch.Tensor) -> None:
    """Raise unless ``x`` and the weights ``values`` are on CPU, float32 or float64, of one
    dtype: :class:`PassError` for the weights (the export's choice), :class:`DataError` for an
    input of another dtype than theirs."""
    if x.device.type != "cpu" or values.device.type != "cpu":
        raise PassError(
            f"chop.csr_linear is a CPU kernel; got x on {x.device} and weights on "
            f"{values.device}: run the sparse graph on CPU (on CUDA use 2:4 semi-structured "
            "weights instead)"
        )
    if values.dtype not in (torch.float32, torch.float64):
        raise PassError(
            f"chop.csr_linear supports float32/float64 weights; got {values.dtype}: keep this "
            "layer dense"
        )
    if x.dtype != values.dtype:
        raise DataError(
            f"chop.csr_linear takes inputs of its weights' dtype {values.dtype}; got x "
            f"{x.dtype}: cast the input"
        )


def _check_width(features: int, in_features: int | None, col_indices: torch.Tensor) -> None:
    """Raise :class:`DataError` unless an input with ``features`` in its last dim fits the
    weight: ``in_features`` wide, or (None) wider than its largest column index."""
    if in_features is None:
        fits = col_indices.numel() == 0 or int(col_indices.max()) < features
        wide = "wider than its largest column index"
    else:
        fits, wide = features == in_features, f"{in_features}"
    if not fits:
        raise DataError(
            f"chop.csr_linear: the input's last dim has {features} features, but the sparse "
            f"layer's weight takes {wide}: give the layer inputs of the shape it was exported "
            "with"
        )


def check_plan(kernels: Sequence[int] | None, from_rows: Sequence[int] | None) -> None:
    """Raise :class:`PassError` unless ``(kernels, from_rows)`` is a valid plan (module doc)."""
    kernels, from_rows = list(kernels or ()), list(from_rows or ())
    if (kernels or from_rows) and (
        len(kernels) != len(from_rows) + 1
        or any(k not in range(len(KERNELS)) for k in kernels)
        or any(r < 1 for r in from_rows) or from_rows != sorted(set(from_rows))
    ):
        raise PassError(
            f"chop.csr_linear: invalid kernel plan kernels={kernels} from_rows={from_rows}; "
            f"kernels are indices into {KERNELS}, one more than the increasing row thresholds "
            "from_rows (e.g. kernels=[0, 1], from_rows=[2]: torch-linear for 1 row, torch-mm from 2)"
        )


def kernel_for(rows: int, kernels: Sequence[int] | None, from_rows: Sequence[int] | None) -> int:
    """The kernel (an index into :data:`KERNELS`) that the plan runs for ``rows`` input rows."""
    if not kernels:
        return TORCH_MM
    return kernels[bisect.bisect_right(from_rows, rows)] if from_rows else kernels[0]


def csr_linear_forward(
    x: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
    out_features: int, bias: torch.Tensor | None = None, kernels: Sequence[int] | None = None,
    from_rows: Sequence[int] | None = None, transposed: bool = False,
    in_features: int | None = None,
) -> torch.Tensor:
    """The computation of ``chop::csr_linear`` (the module doc), as a plain function: no
    dispatcher, no autograd (call it under ``torch.no_grad()``/``inference_mode``)."""
    _check(x, values)
    _check_width(x.shape[-1], in_features, col_indices)
    csr, weight, column = _prepared(values, col_indices, crow_indices,
                                    (out_features, x.shape[-1]), bias)
    return _product(x, weight, csr, bias, column, kernels, from_rows, transposed)


def _prepared(values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
              shape: tuple[int, int], bias: torch.Tensor | None) -> tuple:
    """What a product needs besides ``x``: the three CSR tensors, the CSR view over them (no
    copy, no validation) and the bias as a column for ``addmm``."""
    weight = torch.sparse_csr_tensor(crow_indices, col_indices, values, shape,
                                     check_invariants=False)
    column = None if bias is None else bias.unsqueeze(1)
    return (values, col_indices, crow_indices), weight, column


def bind(
    values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
    shape: tuple[int, int], bias: torch.Tensor | None = None,
    kernels: Sequence[int] | None = None, from_rows: Sequence[int] | None = None,
    transposed: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ csr_linear_forward(x, values, …)`` for one layer whose weight has ``shape``, with
    what does not depend on ``x`` done once: the CSR tensor (over the same storage: in-place
    changes to ``values`` show, nothing is copied), the bias column, the plan's check. Per call
    it checks only the input's width against ``shape`` (the kernels would read past a narrower
    input's end) and its dtype against the weights' (scipy's kernel would compute in another
    dtype, or fail with numpy's message), each a :class:`DataError`: for serving, where each
    microsecond of a small layer counts (:func:`chop.passes.export.common.deployable`)."""
    _check(values, values)  # on CPU, float32/float64
    if bias is not None and bias.dtype != values.dtype:
        raise PassError(f"chop.csr_linear: bias dtype {bias.dtype} differs from the weights' "
                        f"{values.dtype}: cast one of them")
    check_plan(kernels, from_rows)
    bias = None if bias is None else bias.detach()  # for inference: no kernel then needs no_grad
    csr, weight, column = _prepared(values, col_indices, crow_indices, shape, bias)
    kernels, from_rows = list(kernels or ()), list(from_rows or ())

    dtype = values.dtype

    def sparse_linear(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != shape[1] or x.dtype != dtype:
            _check_width(x.shape[-1], shape[1], col_indices)
            _check(x, values)
        return _product(x, weight, csr, bias, column, kernels, from_rows, transposed)

    return sparse_linear


def _product(
    x: torch.Tensor, weight: torch.Tensor, csr: tuple[torch.Tensor, ...],
    bias: torch.Tensor | None, column: torch.Tensor | None, kernels: Sequence[int] | None,
    from_rows: Sequence[int] | None, transposed: bool,
) -> torch.Tensor:
    """``x @ weight.T + bias`` by the plan's kernel, in the layout the op promises; ``csr`` is
    ``weight``'s three tensors (for scipy), ``column`` is ``bias[:, None]``."""
    out_features, features = weight.shape
    rows = x if x.dim() == 2 else x.reshape(-1, features)
    kernel = kernel_for(rows.shape[0], kernels, from_rows)
    if kernel == SCIPY and have_scipy():
        y = _scipy_times(*csr, (out_features, features), rows)
        if column is not None:
            y += column
        y = y.t()
    elif kernel == TORCH_LINEAR:
        # torch's sparse F.linear fails in inference mode on a CSR tensor made outside it (a
        # bound layer's): "Cannot set version_counter for inference tensor"
        outside = torch.is_inference_mode_enabled() and not weight.is_inference()
        with torch.inference_mode(False) if outside else contextlib.nullcontext():
            y = F.linear(rows, weight, bias)
    elif kernel == TORCH_DENSE:
        # one product for both layouts, the transposed one copied (dense @ rows.T rounds
        # otherwise than F.linear on some CPUs, and the layouts must hold the same values)
        y = F.linear(rows, dense_weight(*csr, (out_features, features)), bias)
    elif kernel == TORCH_MV and rows.shape[0] == 1:  # no output buffer, no loop
        row = rows[0]
        y = (torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row))[None]
    elif kernel == TORCH_MV:
        y = rows.new_empty(rows.shape[0], out_features)
        for row, out in zip(rows, y):
            if bias is None:
                torch.mv(weight, row, out=out)
            else:
                torch.addmv(bias, weight, row, out=out)
    else:  # rows.t() as it is: copying it into row-major order first was timed no faster
        y = (torch.mm(weight, rows.t()) if column is None
             else torch.addmm(column, weight, rows.t())).t()
    y = _layout(y, transposed)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)


def dense_weight(values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """The ``shape`` weight that the CSR tensors store, written out dense (a new tensor): the
    stored entries at their places, zeros elsewhere. By scipy's compiled loop where installed
    (4096×4096 at 70–90%: ~40 ms, most of it the fresh zeroed memory), else by ``index_put_``
    (50–100 ms); torch's ``to_dense()`` of the CSR tensor takes 50–270 ms."""
    dense = values.new_zeros(shape)
    tools = _sparsetools()
    if tools is not None and col_indices.dtype == crow_indices.dtype:
        tools.csr_todense(shape[0], shape[1], crow_indices.numpy(), col_indices.numpy(),
                          values.detach().numpy(), dense.numpy())
        return dense
    counts = crow_indices[1:] - crow_indices[:-1]
    rows = torch.repeat_interleave(torch.arange(shape[0], dtype=counts.dtype), counts)
    dense.index_put_((rows, col_indices), values)
    return dense


def _layout(y: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``y`` (rows, out) in the layout the op promises: row-major, or with ``transposed`` the
    transpose of a row-major (out, rows) matrix. Copies only when ``y`` is in the other one."""
    if transposed:
        return y if y.t().is_contiguous() else y.t().contiguous().t()
    return y.contiguous()


# Defined with torch.library.define/impl rather than torch.library.custom_op: the same op, fake
# kernel and autograd formula, ~15 µs less Python wrapping per call.
torch.library.define(
    CSR_OP,
    "(Tensor x, Tensor values, Tensor col_indices, Tensor crow_indices, SymInt out_features, "
    "Tensor? bias=None, int[]? kernels=None, int[]? from_rows=None, bool transposed=False, "
    "SymInt? in_features=None) -> Tensor",
)
torch.library.impl(CSR_OP, "CPU")(csr_linear_forward)


@torch.library.register_fake(CSR_OP)
def _(x, values, col_indices, crow_indices, out_features, bias=None, kernels=None, from_rows=None,
      transposed=False, in_features=None):
    check_plan(kernels, from_rows)  # once, when a graph is traced or exported
    if isinstance(in_features, int) and isinstance(x.shape[-1], int):
        _check_width(x.shape[-1], in_features, col_indices)
    return empty_result(x, out_features, transposed)


def empty_result(x: torch.Tensor, out_features: int, transposed: bool) -> torch.Tensor:
    """An uninitialised tensor with the shape, dtype and strides of ``csr_linear``'s result
    for input ``x`` (works on fake tensors, symbolic sizes included)."""
    if not transposed:
        return x.new_empty(*x.shape[:-1], out_features)
    rows = math.prod(x.shape[:-1])
    return x.new_empty(out_features, rows).t().reshape(*x.shape[:-1], out_features)


BACKWARD_OP = "chop::csr_linear_backward"
torch.library.define(
    BACKWARD_OP,
    "(Tensor grad, Tensor values, Tensor col_indices, Tensor crow_indices, SymInt in_features) "
    "-> Tensor",
)


@torch.library.impl(BACKWARD_OP, "CPU")
def csr_linear_backward(
    grad: torch.Tensor, values: torch.Tensor, col_indices: torch.Tensor,
    crow_indices: torch.Tensor, in_features: int,
) -> torch.Tensor:
    """``grad @ W`` for ``W`` in CSR form: the gradient of ``csr_linear`` w.r.t. ``x``."""
    _check(grad, values)
    out_features = grad.shape[-1]
    rows = grad.reshape(-1, out_features)
    weight = torch.sparse_csr_tensor(crow_indices, col_indices, values,
                                     (out_features, in_features), check_invariants=False)
    y = torch.mm(weight.t(), rows.t()).t().contiguous()  # W.T is W's CSC form: no conversion
    return y.reshape(*grad.shape[:-1], in_features)


@torch.library.register_fake(BACKWARD_OP)
def _(grad, values, col_indices, crow_indices, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


class _CsrLinearGrad(torch.autograd.Function):
    """``csr_linear`` under autograd: the product below the Autograd key, the gradient to ``x``
    and ``bias`` (only those asked for); the stored values and indices get none."""

    @staticmethod
    def forward(ctx: Any, keyset: torch._C.DispatchKeySet, x: torch.Tensor, values: torch.Tensor,
                col: torch.Tensor, crow: torch.Tensor, *rest: Any) -> torch.Tensor:
        with torch._C._AutoDispatchBelowAutograd():
            y = csr_linear.redispatch(keyset & _AFTER_AUTOGRAD, x, values, col, crow, *rest)
        ctx.save_for_backward(values, col, crow)
        ctx.in_features = x.shape[-1]
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        values, col, crow = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (keyset, x, values, col, crow, out_features, bias, ...)
        grad_x = (torch.ops.chop.csr_linear_backward(grad, values, col, crow, ctx.in_features)
                  if needs[1] else None)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if needs[6] else None
        return None, grad_x, None, None, None, None, grad_bias, None, None, None, None


def _autograd_kernel(keyset: torch._C.DispatchKeySet, x: torch.Tensor, values: torch.Tensor,
                     col: torch.Tensor, crow: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None = None, kernels: Sequence[int] | None = None,
                     from_rows: Sequence[int] | None = None, transposed: bool = False,
                     in_features: int | None = None) -> torch.Tensor:
    """The op's Autograd kernel (see the module doc): ``torch.library.register_autograd``'s
    generic one also checks for out= arguments, builds a metadata object and fills in the
    defaults at every call, with or without grad. Like it, this one goes below the Autograd
    key by redispatching, so tracing (FakeTensor, ``torch.export``, ``torch.compile``) records
    the op itself; except that without grad, on plain CPU tensors with no dispatch mode active
    (the CPU kernel is what the redispatch would reach), it calls the kernel's function
    directly, ~4 µs a call less (``bench_sparse.py``'s fixed costs). ``torch.jit.trace``
    records the op above this kernel."""
    args = (x, values, col, crow, out_features, bias, kernels, from_rows, transposed, in_features)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _CsrLinearGrad.apply(keyset, *args)
    below = keyset & _AFTER_AUTOGRAD
    if below.highestPriorityTypeId() == _CPU:
        return csr_linear_forward(*args)  # plain CPU tensors, nothing tracing: the CPU kernel
    with torch._C._AutoDispatchBelowAutograd():
        return csr_linear.redispatch(below, *args)


csr_linear = torch.ops.chop.csr_linear.default  # x @ W.T + bias by the plan's kernel (module doc)
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_CPU = torch._C.DispatchKey.CPU
_LIBRARY = torch.library.Library("chop", "FRAGMENT")  # held: dropping it drops the kernel
_LIBRARY.impl("csr_linear", _autograd_kernel, "Autograd", with_keyset=True)


def plan_kernels(
    values: torch.Tensor, col_indices: torch.Tensor, crow_indices: torch.Tensor,
    shape: tuple[int, int], *, rows: Sequence[int] = PLAN_ROWS,
    candidates: Sequence[str] | None = None, repeats: int = 7,
) -> tuple[list[int], list[int], dict[int, dict[str, float]]]:
    """Time the kernels on one CSR weight of ``shape`` at each input row count of ``rows`` and
    return its plan ``(kernels, from_rows)`` and the timings ``{rows: {kernel: seconds}}``.

    Each row count is timed with the kernels interleaved, so load from elsewhere hits them
    alike, and each kernel's fastest of ``repeats`` rounds counts: its cost when least
    disturbed (from ``_MANY_ROWS`` rows on, of at most ``_FEW_REPEATS`` rounds: a call takes
    0.1–1 s there on a large layer). Load that lasts through the whole timing still skews the
    plan, and the multi-threaded ``torch-mm`` most: with the other core of a 2-core machine
    busy, a plan chose the one-thread ``torch-mv`` at every row count, far slower at 32 rows
    once the machine was quiet. Plan where and when the model will serve.

    Between two timed row counts the plan switches where the lines through the two winners'
    timings there cross (at the counts' geometric mean when one was not timed at both). Past
    the last, each kernel timed at the last two row counts is taken to cost what the line
    through those two timings gives (a sparse product's cost grows in proportion to the rows,
    a dense one's nearly so from tens of rows on, and writing the weight out costs the same at
    any count): the last winner runs until a line of a smaller slope crosses its own, and so on.

    ``candidates`` defaults to every kernel (scipy only when installed); ``torch-dense``, whose
    writing out of the weight costs a sparse product of tens of rows, is timed only from 64
    rows (``_TIMED_FROM``). A kernel more than 4× slower than the best at one row count is not
    timed at the larger ones (it only falls further behind there, and costs the most), except
    ``torch-mm`` and ``torch-dense``, whose cost per row falls as the rows grow: ``torch-mm``
    can trail ``torch-mv`` by several times at one row and still win from a few rows on. A
    burst of load during the one-row timing once dropped it, and the plan ran ``torch-mv`` at
    every batch size.
    """
    names = list(candidates or [k for k in KERNELS if k != "scipy" or have_scipy()])
    unknown = [k for k in names if k not in KERNELS]
    if unknown or not names:
        raise PassError(f"plan_kernels: unknown kernels {unknown}; choose from {KERNELS}")
    g = torch.Generator().manual_seed(0)
    winners, timings = [], {}
    for n in rows:
        timed = [k for k in names if n >= _TIMED_FROM.get(k, 0)] or names
        x = torch.randn(n, shape[1], generator=g, dtype=values.dtype)
        fns = {k: _bound(x, values, col_indices, crow_indices, shape, KERNELS.index(k))
               for k in timed}
        timings[n] = interleaved_seconds(
            fns, repeats=repeats if n < _MANY_ROWS else min(repeats, _FEW_REPEATS), warmup=1,
            statistic="min")
        best = min(timings[n].values())
        winners.append(KERNELS.index(min(timings[n], key=timings[n].get)))
        names = [k for k in names if timings[n].get(k, 0.0) <= 4 * best or k in _CHEAPER_PER_ROW]
    kernels, from_rows = [winners[0]], []
    for (low, high), kernel in zip(itertools.pairwise(rows), winners[1:]):
        if kernel != kernels[-1]:
            kernels.append(kernel)
            from_rows.append(_switch(timings, low, high, KERNELS[kernels[-2]], KERNELS[kernel]))
    for kernel, start in _past_the_last(timings, list(rows)):
        if kernel != kernels[-1]:
            kernels.append(kernel)
            from_rows.append(start)
    return kernels, from_rows, timings


_CHEAPER_PER_ROW = ("torch-mm", "torch-dense")  # never dropped for trailing at few rows


def _switch(timings: dict[int, dict[str, float]], low: int, high: int, before: str,
            after: str) -> int:
    """The row count from which ``after`` (the winner at ``high`` rows) runs instead of
    ``before`` (the winner at ``low``): where the lines through their timings at ``low`` and
    ``high`` cross, or the geometric mean of the two counts when one was not timed at both."""
    if all(k in timings[low] and k in timings[high] for k in (before, after)):
        lead = timings[low][after] - timings[low][before]  # > 0: `before` won at `low`
        trail = timings[high][after] - timings[high][before]  # <= 0: `after` won at `high`
        crossing = low + (high - low) * lead / (lead - trail) if lead > trail else high
    else:
        crossing = (low * high) ** 0.5
    return min(high, max(low + 1, math.ceil(crossing)))


def _past_the_last(timings: dict[int, dict[str, float]], rows: list[int]) -> list[tuple[int, int]]:
    """The bands past the last timed row count, as ``(kernel, from_rows)``: each kernel timed at
    the last two counts costs what the line through its two timings gives; from the last
    winner on, the kernel whose line first drops below the running one's takes over."""
    if len(rows) < 2:
        return []
    low, high = rows[-2], rows[-1]
    both = [k for k in timings[high] if k in timings[low]]
    at = {k: timings[high][k] for k in both}
    slope = {k: (timings[high][k] - timings[low][k]) / (high - low) for k in both}
    running = min(timings[high], key=timings[high].get)
    if running not in both:
        return []
    bands, past = [], 0.0  # rows past `high` where the running kernel took over
    while True:
        crossings = [((at[k] - at[running]) / (slope[running] - slope[k]), slope[k], k)
                     for k in both if slope[k] < slope[running]]
        crossings = [c for c in crossings if c[0] >= past]
        if not crossings:
            return bands
        past, _, running = min(crossings)
        band = (KERNELS.index(running), high + max(1, math.ceil(past)))
        if bands and bands[-1][1] == band[1]:  # two crossings within one row: the later holds
            bands.pop()
        bands.append(band)


def _bound(x: torch.Tensor, values: torch.Tensor, col: torch.Tensor, crow: torch.Tensor,
           shape: tuple[int, int], kernel: int) -> Any:
    return lambda: csr_linear_forward(x, values, col, crow, shape[0], None, [kernel], [], False,
                                      shape[1])


def describe_plan(kernels: Sequence[int] | None, from_rows: Sequence[int] | None) -> str:
    """A plan in words: ``"torch-linear below 2 rows, torch-mm from 2"``."""
    if not kernels:
        return KERNELS[TORCH_MM]
    parts = [KERNELS[kernels[0]] + (f" below {from_rows[0]} rows" if from_rows else "")]
    parts += [f"{KERNELS[k]} from {r}" for k, r in zip(kernels[1:], from_rows)]
    return ", ".join(parts)


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
