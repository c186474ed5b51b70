"""torch.distributed for chop: is a process group up, sums over the ranks, and where a rank's
shard of a DTensor sits in the whole tensor.

Two ways chop runs on several processes, both on torch.distributed (gloo on CPU, nccl on GPU):

- **Data parallel**: every rank holds the whole model and scores its own batches; the criteria
  sum what they accumulate over the ranks (:func:`sum_over_ranks`), so every rank holds the
  same saliency and ``mask`` makes the same masks everywhere.
- **Sharded** (FSDP2 ``fully_shard``, a DTensor tensor-parallel plan): each rank holds boxes of
  the parameters; :func:`piece` says where its box lies in the whole tensor, and the exact
  selection of :mod:`chop.kernels.select` adds up its histograms over the ranks
  (:func:`count_reducer`) instead of gathering scores.

Every collective goes through :func:`all_reduce` (or :func:`broadcast`), which turns a failure
or a timeout (another rank failed, is stuck, or called a different collective) into a
:class:`~chop.errors.DistributedError` that names the collective and the rank. How long a
rank waits for the others is the process group's ``timeout`` (``init_process_group(timeout=...)``);
with gloo the waiting rank gets the error. With nccl, CPU tensors (the int64 histograms) are moved to the current CUDA device for the
collective and back, and a timed-out collective is found by NCCL's watchdog, which by default
ends the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``) instead of raising.

``torch.distributed`` is part of ``import torch``; the DTensor package is only imported when a
DTensor already exists.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from chop.errors import DistributedError, OptionError
from chop.kernels.select import Piece

_BUCKET = 1 << 24  # entries summed in one collective (smaller tensors are packed together)


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, *, what: str, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ranks in place (``op``: sum or max) and return it; a failed
    or timed-out collective is a :class:`DistributedError` saying ``what`` was being reduced."""
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    return _in_place(tensor, "all_reduce", what, lambda t: dist.all_reduce(t, op=reduce_op))


def broadcast(tensor: torch.Tensor, *, what: str, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s and return it."""
    return _in_place(tensor, "broadcast", what, lambda t: dist.broadcast(t, src=src))


def sum_over_ranks(tensors: Sequence[torch.Tensor], *, what: str, agree: str | None = None
                   ) -> None:
    """Replace each tensor by its sum over the ranks, in place. Every rank must pass tensors of
    the same shapes and dtypes in the same order, and the same ``agree`` (what makes the sums
    comparable: the criterion and its options; default ``what``): that is checked first, in one
    collective (a mismatch would add unrelated sums, or hang, or abort in gloo), then small
    tensors are packed into buckets of ``_BUCKET`` entries so that biases do not cost one
    collective each."""
    count, numel = len(tensors), sum(t.numel() for t in tensors)
    layout = _digest(";".join(f"{tuple(t.shape)}{t.dtype}" for t in tensors))
    purpose = _digest(what if agree is None else agree)
    mine = [count, numel, layout, purpose]
    seen = all_reduce(torch.tensor(mine + [-v for v in mine]), what=what, op="max").tolist()
    if seen[0] != -seen[4] or seen[1] != -seen[5]:
        raise DistributedError(
            f"{what}: the ranks sum different tensors: rank {rank()} has {count} tensor(s) of "
            f"{numel} entries in all, the ranks have between {-seen[4]} and {seen[0]} tensors of "
            f"between {-seen[5]} and {seen[1]} entries; every rank must score the same "
            "parameters of the same model with the same options"
        )
    if seen[2] != -seen[6]:
        raise DistributedError(
            f"{what}: the ranks sum tensors of different shapes or dtypes (a model in float64 "
            "on one rank, float32 on another?); every rank must score the same model"
        )
    if seen[3] != -seen[7]:
        raise DistributedError(
            f"{what}: the ranks score differently (rank {rank()}: "
            f"{what if agree is None else agree}); every rank must run the same criterion with "
            "the same options"
        )
    bucket: list[torch.Tensor] = []
    for t in [*tensors, None]:
        if bucket and (t is None or t.dtype != bucket[0].dtype or t.device != bucket[0].device
                       or sum(b.numel() for b in bucket) + t.numel() > _BUCKET):
            _sum_bucket(bucket, what)
            bucket = []
        if t is not None:
            bucket.append(t)


def _digest(text: str) -> int:
    """A 56-bit hash of ``text``, the same in every process (``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def _sum_bucket(bucket: list[torch.Tensor], what: str) -> None:
    if len(bucket) == 1:
        all_reduce(bucket[0], what=what)
        return
    flat = all_reduce(torch.cat([t.reshape(-1) for t in bucket]), what=what)
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
        t.copy_(part.view(t.shape))


def count_reducer(what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``reduce`` argument of :mod:`chop.kernels.select` for the default process group:
    sums a (CPU, int64) histogram or count vector over the ranks."""
    return lambda counts: all_reduce(counts, what=what)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2 or a tensor-parallel
    plan)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return False  # (a parameter over a DTensor has the DTensor's type)
    if "torch.distributed.tensor" not in sys.modules:
        return False  # no DTensor can exist before its package is imported
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its memory), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's shard of ``param.grad``, laid out like ``local(param)`` (a DTensor gradient
    with other placements, e.g. ``Partial``, is redistributed to the parameter's first)."""
    grad = param.grad
    if grad is None or not is_dtensor(grad):
        return grad
    if tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(param.device_mesh, param.placements)
    return grad.to_local()


def piece(tensor: torch.Tensor, score: torch.Tensor, name: str) -> Piece:
    """Where this rank's ``score`` (shaped like ``tensor``'s local shard) lies in the whole
    tensor, for :mod:`chop.kernels.select`.

    A DTensor's shard is the box ``local shape`` at ``global offset``
    (``compute_local_shape_and_global_offset``); ``Replicate`` mesh dimensions hold copies, of
    which only the rank at coordinate 0 counts. A plain tensor on a sharded model is held whole
    by every rank, and rank 0 counts it. Placements that are not one box per rank
    (``Partial``, the strided shards of FSDP2 over tensor parallel) are refused."""
    if not is_dtensor(tensor):
        return Piece(score, tuple(tensor.shape), (0,) * tensor.dim(), counted=rank() == 0)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tensor.placements
    odd = [p for p in placements if type(p) not in (Shard, Replicate)]
    if odd:
        raise OptionError(
            f"{name} is placed as {placements}; chop selects over shards that are one box of "
            f"the tensor per rank (Shard and Replicate placements), not {odd[0]}: shard it "
            "with fully_shard or a tensor-parallel plan alone, or score it unsharded"
        )
    if mesh.size() != world_size():
        raise OptionError(
            f"{name} lives on a device mesh of {mesh.size()} ranks in a process group of "
            f"{world_size()}; chop sums its selection over the whole group, so the mesh must "
            "span every rank"
        )
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    if tuple(score.shape) != tuple(shape):
        raise OptionError(f"{name}: the score's shape {tuple(score.shape)} is not the local "
                          f"shard's {tuple(shape)}")
    coordinate = mesh.get_coordinate()
    counted = all(c == 0 for c, p in zip(coordinate, placements) if isinstance(p, Replicate))
    return Piece(score, tuple(tensor.shape), tuple(offset), counted=counted)


def collective_failure(error: BaseException, name: str, what: str) -> DistributedError:
    """The :class:`DistributedError` of ``error``, raised by the collective ``name`` (its own,
    or one inside a sharded model's forward or backward) while ``what`` ran."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DistributedError(
        f"{what}: {name} failed on rank {rank()} of {world_size()}: {message}. Another rank "
        "probably failed before reaching this collective, is stuck, or called a different one "
        "(under FSDP every rank must run as many forwards and backwards): look at the other "
        "ranks' errors. A rank that never arrives is given up on after the process group's "
        "timeout (init_process_group(timeout=...))"
    )


# what gloo's and NCCL's errors say (gloo's transport raises plain RuntimeErrors)
_BACKEND_ERRORS = ("gloo", "NCCL", "Timed out", "Connection closed by peer",
                   "Connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed or timed-out collective of the process group."""
    return active() and (isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _BACKEND_ERRORS)))


def _in_place(
    tensor: torch.Tensor, name: str, what: str, call: Callable[[torch.Tensor], Any]
) -> torch.Tensor:
    """Run the collective ``call`` on ``tensor`` (through a contiguous copy on the backend's
    device if needed: nccl cannot reduce CPU tensors) and return ``tensor``."""
    device = tensor.device
    if device.type == "cpu" and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = tensor
    if device != tensor.device or not tensor.is_contiguous():
        buffer = tensor.to(device, memory_format=torch.contiguous_format, copy=True)
    try:
        call(buffer)
    except RuntimeError as e:  # DistBackendError, DistNetworkError, gloo and nccl timeouts
        raise collective_failure(e, f"torch.distributed {name}", what) from e
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor
