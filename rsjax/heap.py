"""Keep freed memory in the process instead of returning it to the kernel (glibc malloc, CPU runs).

XLA:CPU allocates each execution's temporary buffer (all of a train step's activations: 542 MB for
a CIFAR ResNet-110 step at batch 64) with ``posix_memalign`` on one of its pool threads and frees it
when the step ends. glibc serves a request that large from a thread arena with a fresh ``mmap`` and
gives it back with ``munmap``, so every step touches half a gigabyte of new pages: 132,000 page
faults per step, each page zeroed by the kernel, 0.45-0.5 CPU seconds of system time in a step of
about one second on a 2-core machine (measured in docs/training.md, "The step on a CPU").

:func:`retain_freed_memory` sets, through ``mallopt`` (the same as the environment variables
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0`` and no trimming):

- ``M_ARENA_MAX = 1``: every thread allocates from the main arena (a thread arena falls back to
  ``mmap`` for a block larger than its 64 MB heaps whatever the other settings say);
- ``M_MMAP_MAX = 0``: no allocation is served by ``mmap``, so large blocks come from the heap;
- ``M_TRIM_THRESHOLD = -1``: freed memory at the top of the heap is never given back (mallopt(3):
  "-1 disables trimming completely"; a finite threshold would still return a MACER ResNet-110
  step's gigabytes each step).

The next step then reuses the same pages: no faults. The costs: the process keeps its peak
footprint (as the caching allocators of PyTorch's CUDA backend and of XLA:GPU do), and every
thread allocates under the main arena's one lock. It must run
before JAX starts its thread pools (before the first array is created), as threads keep the arena
they started with. ``rsjax train`` and ``benchmarks/train_throughput.py`` call it; elsewhere
(tests, certify) nothing changes. On a C library without ``mallopt`` (not glibc) it does nothing
and says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1, "arena_max=1"), (M_MMAP_MAX, 0, "mmap_max=0"),
            (M_TRIM_THRESHOLD, -1, "trim_threshold=-1"))


@functools.cache
def retain_freed_memory() -> str:
    """Apply :data:`SETTINGS` with ``mallopt`` once per process; returns what was set
    (``"arena_max=1,mmap_max=0,trim_threshold=-1"``) or ``"unchanged: <reason>"``."""
    if not sys.platform.startswith("linux"):
        return f"unchanged: {sys.platform} is not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return f"unchanged: no mallopt ({e})"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = [name for param, value, name in SETTINGS if mallopt(param, value) == 1]
    return ",".join(done) if done else "unchanged: mallopt refused every setting"


__all__ = ["SETTINGS", "retain_freed_memory"]
