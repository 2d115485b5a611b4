"""The serving processes' C allocator setting (app/allocator.py): after a big block is freed,
glibc would serve the next medium allocations from its heap, which keeps them; with the
threshold fixed they are mapped and go back to the system when freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a child process: the test process's own allocator is left as it is.
PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    from app import allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    fixed = sys.argv[1] == "fixed"
    if fixed:
        assert allocator.fix_mmap_threshold()
    libc.free(libc.malloc(16 << 20))  # a freed 16 MiB block raises glibc's dynamic threshold
    before = libc.mallinfo2().hblkhd
    blocks = [libc.malloc(1 << 20) for _ in range(8)]
    mapped = libc.mallinfo2().hblkhd - before
    for b in blocks:
        libc.free(b)
    assert allocator.trim() in (True, False)
    print(mapped >> 20)
""")


def mapped_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's; elsewhere the module does nothing")
def test_fixed_threshold_keeps_medium_blocks_mapped() -> None:
    assert hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    assert mapped_mib("default") == 0  # after the big free, 1 MiB blocks come from the heap
    assert mapped_mib("fixed") >= 8  # with the threshold at 256 KiB each is a mapping of its own
