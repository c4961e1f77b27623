"""glibc heap settings for training on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
LARGEST_MMAP_THRESHOLD = 32 * 2**20  # the most glibc accepts on 64-bit systems
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same activation buffers (megabytes each) every
    time. By default glibc returns large freed blocks to the OS (unmapping them, or trimming
    the heap), so the next step page-faults fresh memory in again: ~50,000 faults per update
    of the 25M benchmark model. Serving blocks up to 32 MiB from the heap and never trimming
    keeps those pages. Peak memory is unchanged; resident memory just does not shrink after
    the peak. Returns whether the settings took effect (False where libc is not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
        )
    except (OSError, AttributeError):
        return False
