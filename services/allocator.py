"""glibc malloc tuning for processes that move images in megabyte messages.

By default glibc serves each block over 128 KB with a fresh mmap and gives
freed heap tops back to the kernel, so every buffer of a 1 MB image chunk
(protobuf encode and decode, gRPC's slices, the bytes handed to a file) is
new memory that the kernel zero-fills a page at a time: measured here, 5x
the cost of the copies themselves. Keeping such blocks on the heap, and the
heap's top mapped, lets the next chunk reuse the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 4 MB come from the heap (a 1 MB chunk's buffers are a bit over
# 1 MB); up to 32 MB of free heap top stays mapped. Both stay far below the
# services' 200 MB budget.
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 32 << 20


def reuse_large_blocks() -> bool:
    """Apply the tuning; False where the C library is not glibc (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
