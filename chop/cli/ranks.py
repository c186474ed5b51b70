"""``torchrun``: the command line as one rank of a process group.

``torchrun --nproc-per-node N -m chop.cli transform ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`process_group` then
joins the group (gloo for CPU tensors, and NCCL for CUDA tensors when CUDA is available), with
a timeout so that a rank that died never leaves the others waiting for ever, and leaves it when
the command ends. Every rank loads the same config, model and data and runs the pipeline with
``shared_data``: the criteria score batch i on rank i mod N and sum over the ranks, so each
batch is scored once and every rank ends with the same masks. Rank 0 alone prepares and writes
OUTDIR and prints; the other ranks print only their errors.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager

from chop.errors import ConfigError, DistributedError

TIMEOUT_S = 600  # a collective that waits longer than this fails the run (DistributedError)


def world() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's environment; ``(0, 1)`` outside torchrun."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
            "must be integers (torchrun sets them)"
        ) from None
    if size > 1 and not (0 <= rank < size and os.environ.get("MASTER_ADDR")):
        raise ConfigError(
            f"WORLD_SIZE={size} but RANK={rank} or MASTER_ADDR is missing or wrong; start chop "
            "with torchrun --nproc-per-node N -m chop.cli ..., which sets them"
        )
    return rank, max(size, 1)


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """Join torchrun's process group for the block (nothing outside torchrun); yields
    ``(rank, world size)``."""
    rank, size = world()
    if size == 1:
        yield rank, size
        return
    import torch
    import torch.distributed as dist

    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    except Exception as e:  # the store or a peer cannot be reached
        raise DistributedError(
            f"rank {rank} of {size} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({backend}): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        ) from e
    try:
        yield rank, size
        dist.barrier()  # leave together: a rank gone while another still talks aborts it
    finally:
        dist.destroy_process_group()
