"""``reuse_freed_memory``: in a fresh process (the allocator belongs to the process), a freed
64 MiB tensor's memory serves the next one without page faults; where the process chose its
allocator itself, nothing changes."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from chop.kernels import allocator

GLIBC = allocator._glibc() is not None and hasattr(ctypes.CDLL(None), "mallinfo2")
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc (2.33+, for mallinfo2) only")

PROBE = r'''
import ctypes, json, resource, sys
import torch
from chop.kernels.allocator import reuse_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
before = libc.mallinfo2().hblkhd
x = torch.ones(16 << 20)  # 64 MiB, above glibc's largest dynamic mmap threshold
mapped = libc.mallinfo2().hblkhd - before  # bytes in blocks mapped apart from the heap
del x
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(12 << 20)  # 48 MiB: fits in the freed block (same-size memalign requests do not)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
print(json.dumps({"applied": applied, "mapped": mapped, "faults": faults}))
'''


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("CHOP_MALLOC", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_a_freed_large_tensor_is_reused_from_the_heap_without_page_faults():
    default = probe("default")
    assert default["mapped"] >= 64 << 20  # glibc maps it apart, and unmaps it when freed
    reused = probe("reuse")
    assert reused["applied"] is True
    assert reused["mapped"] == 0  # from the heap
    assert reused["faults"] < (64 << 20) // 4096 // 100  # < 1% of its pages touched afresh


@needs_glibc
def test_a_process_that_chose_its_allocator_is_left_alone():
    result = probe("reuse", CHOP_MALLOC="system")  # the other reasons: the test below
    assert result["applied"] is False
    assert result["mapped"] >= 64 << 20  # still mapped apart, as glibc does by default


JEMALLOC = "7f3a2c000000-7f3a2c02a000 r--p 00000000 fe:01 1234 /usr/lib/libjemalloc.so.2\n"


@pytest.mark.parametrize("env,maps,reason", [
    ({"CHOP_MALLOC": "System "}, "", "CHOP_MALLOC=System"),
    ({"CHOP_MALLOC": "off"}, "", "CHOP_MALLOC=off"),  # any value: the user opted out
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "", "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"MALLOC_ARENA_MAX": "2"}, "", "MALLOC_ARENA_MAX is set"),  # any of glibc's MALLOC_*
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}, "", "GLIBC_TUNABLES sets malloc"),
    ({}, JEMALLOC, "jemalloc is loaded"),  # in the process, however it came
    ({"LD_PRELOAD": "libjemalloc.so.2"}, "", None),  # named but not loaded: glibc allocates
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, None, "tcmalloc is preloaded"),  # no /proc
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, "", None),
])
def test_the_reasons_to_leave_the_allocator_alone(monkeypatch, env, maps, reason):
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    for name in ("CHOP_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(allocator, "_mapped_files", lambda: maps)
    found = allocator._why_not(allocator._glibc() or ctypes.CDLL(None))
    assert (found is None) if reason is None else found.startswith(reason)
    assert allocator._why_not(None).startswith(reason or "the C library is not glibc")



def test_the_memory_map_lists_the_loaded_libraries():
    maps = allocator._mapped_files()
    if maps is None:
        pytest.skip("no /proc/self/maps here")
    assert os.path.realpath(sys.executable) in maps  # the program itself is mapped
