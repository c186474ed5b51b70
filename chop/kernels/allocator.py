"""Keep freed CPU memory for reuse instead of handing it back to the operating system.

torch allocates CPU tensors with the C library's ``malloc``. glibc's serves every block larger
than its mmap threshold, which it raises as blocks are freed but never above 32 MiB, straight
from the kernel (``mmap``), and returns it (``munmap``) when the tensor is freed. A forward or
backward at a realistic batch allocates its activations afresh at every call, most of them
larger than 32 MiB (a 16×256×56×56 float activation is 49 MiB), so every call pays a page
fault and the zeroing of a fresh page for every 4 KiB it touches. On this project's 2-core
machine a ResNet-50 forward at batch 32 took 6.34 s with 1.27M page faults per call, and 3.21 s
with none once freed memory was kept (``benchmarks/bench_allocator.py``, which measures the two
side by side). torch's CPU performance guide recommends jemalloc or tcmalloc for the same
reason; :func:`reuse_freed_memory` gets the same effect from glibc itself, in the running
process, with two ``mallopt`` settings:

- ``M_MMAP_THRESHOLD`` = 1 GiB: blocks up to 1 GiB come from the heap, where freed blocks are
  reused (setting it also stops glibc's own adjustment of the threshold);
- ``M_TRIM_THRESHOLD`` = 2 GiB - 1: free memory at the top of the heap is given back only when
  it exceeds that, so the next step's activations find it still mapped.

The cost: the process keeps the memory of its largest step until it exits, and its peak is
higher (15–26% in that benchmark: 1,159 against 921 MiB for that forward). glibc does not
always fit a new block into freed ones: in a probe, a freed 64 MiB block did not serve the next
64 MiB request (torch asks for 64-byte aligned blocks) but did serve a 48 MiB one. Where shapes
change from call to call, memory grows with either setting (fragmentation), faster with this
one.

The ``chop`` command line calls it at the start of ``transform`` and ``train``; library code
never does (the allocator belongs to the process, so the program decides). It leaves glibc
alone when the process already chose: any of glibc's ``MALLOC_*`` environment variables set
(``MALLOC_ARENA_MAX``, ``MALLOC_TRIM_THRESHOLD_``…), glibc tunables for malloc in
``GLIBC_TUNABLES``, another allocator loaded into the process (jemalloc, tcmalloc or mimalloc
among the files it maps, e.g. through ``LD_PRELOAD``), or ``CHOP_MALLOC`` set (to ``system``,
the documented value, or anything else); and it does nothing where the C library is not glibc
(macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # bytes: larger blocks are still mapped apart (and unmapped when freed)
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free memory at the heap top before it is given back
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _why_not(libc: ctypes.CDLL | None) -> str | None:
    """Why :func:`reuse_freed_memory` leaves the allocator alone here, or None."""
    value = os.environ.get("CHOP_MALLOC", "").strip()
    if value:
        return f"CHOP_MALLOC={value}"
    chosen = sorted(name for name in os.environ if name.startswith("MALLOC_"))
    if chosen:
        return f"{chosen[0]} is set"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc tunables"
    files = _mapped_files()
    where = "loaded" if files is not None else "preloaded"
    files = os.environ.get("LD_PRELOAD", "") if files is None else files
    other = next((name for name in _OTHER_ALLOCATORS if name in files), None)
    if other is not None:
        return f"{other} is {where}"
    if libc is None:
        return "the C library is not glibc"
    return None


def _mapped_files() -> str | None:
    """The process's memory map (``/proc/self/maps``: every shared library it loaded, by
    path), or None where there is none to read (then ``LD_PRELOAD`` tells instead)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return maps.read()
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process (see the module doc); returns
    whether it did. Safe to call more than once; a no-op, logged at debug level with the
    reason, where the process chose its allocator itself or the C library is not glibc."""
    libc = _glibc()
    reason = _why_not(libc)
    if reason is not None or libc is None:
        log.debug("malloc left as it is: %s", reason)
        return False
    done = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    log.debug("malloc keeps freed blocks up to %d bytes for reuse: %s", MMAP_THRESHOLD, done)
    return done


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version`` and
    ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no handle to the process itself
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
