"""The C allocator of a process that serves the model (glibc's malloc, where it is there).

glibc serves an allocation above its mmap threshold with a mapping of its own, returned to
the system when freed, and one below it from the heap, which keeps it. The threshold starts at
128 KiB but rises to the size of every mapped block freed (up to 32 MiB): after loading a
checkpoint (float16 tensors converted to float32 and dropped) it sits at several MiB, so the
decoder's per-step tensors and the beams' rows then stay in the heap after their requests end.
Fixing the threshold keeps big blocks mapped: the model worker's memory after 200 mixed requests
measured 463 MiB against 494 (bench/memory.py). Elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("chatbot.allocator")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 256 * 1024


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_mmap_threshold() -> bool:
    """Keep allocations of MMAP_THRESHOLD_BYTES and more mapped (returned when freed). Call before
    loading the model. True where it took effect."""
    libc = _glibc()
    ok = bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("malloc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
    return ok


def trim() -> bool:
    """Give the heap's free memory back to the system (after loading and warming up)."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
