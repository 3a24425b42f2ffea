"""Keep large CPU buffers in the process between uses, instead of mapping fresh pages for each (glibc malloc).

glibc serves an allocation above its mmap threshold with freshly mapped pages, which the kernel faults in and zeroes
on first touch, and unmaps them on free. The threshold starts at 128 KiB and rises as large blocks are freed, so
whether a convolution's 16 MiB activation is recycled or re-mapped on every call depends on what the process happened
to allocate before (even on which modules it imported): in docs/benchmarks.md the unlucky side made the VAE encoder
2x slower on CPU. Entry points (``dalle``, ``python -m dalle_train``) fix the thresholds once at start-up; a library
never changes them behind its caller's back.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's own upper bound for the threshold on 64-bit systems
TRIM_THRESHOLD_BYTES = 2**30  # free heap memory above this goes back to the system
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def keep_large_buffers() -> bool:
    """Fix glibc's malloc thresholds for this process; True when they were set.

    Nothing happens off Linux, without glibc's ``mallopt``, or when the user chose an allocator setup already
    (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment, or a preloaded allocator such as
    jemalloc or tcmalloc).
    """
    if not sys.platform.startswith("linux") or any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mapped) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
