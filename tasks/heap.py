"""Large freed blocks go back to the operating system (glibc's malloc), so that the audit's
peak memory is what it holds, not what its threads once held.

glibc raises its mmap threshold each time a large mmapped block is freed, after which such
blocks come from per-thread heaps and stay there, fragmented. The audit reads each node's
answer in several threads (megabyte chunks, hash tables of 300,000 entries resized as they
grow): with every caller gone at once, 300,000 unused queues, its peak RSS was 277-295 MB with
the threshold free to rise and 261-262 MB with it pinned at glibc's initial 128 KiB.
"""

from __future__ import annotations

import ctypes

#: glibc's mallopt parameter for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
M_MMAP_THRESHOLD = -3
#: Blocks at least this large are mmapped, and unmapped when freed: glibc's initial threshold.
THRESHOLD_BYTES = 128 * 1024


def release_large_blocks() -> bool:
    """Pin the threshold for the whole process (a worker's too: blocks of 128 KiB and more then
    cost a system call each, which the audit's hundred or so do not notice). False where the C
    library is not glibc: nothing changed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
